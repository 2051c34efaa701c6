"""Names of published models (scTab / HCE paper) resolve offline: renamed, obsolete and 'consider' terms."""

import logging
import pickle
from pathlib import Path

import pytest

from schce.ontology import CellOntology, LabelMappingError, load_cell_ontology

SCTAB_NAMES = Path(__file__).parent / "data" / "sctab_cell_types.txt"


def _sctab_names() -> list[str]:
    lines = SCTAB_NAMES.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def embedded() -> CellOntology:
    return load_cell_ontology()


def test_all_164_sctab_names_resolve_to_distinct_live_terms(embedded):
    names = _sctab_names()
    assert len(names) == 164
    mapping = embedded.map_labels(names)
    assert list(mapping) == names
    assert len(set(mapping.values())) == 164
    assert all(term in embedded for term in mapping.values())


@pytest.mark.parametrize(
    ("old_name", "term", "current_name"),
    [
        ("lamp5 GABAergic cortical interneuron", "CL:4023011", "lamp5 GABAergic interneuron"),
        ("vip GABAergic cortical interneuron", "CL:4023016", "VIP GABAergic interneuron"),
        ("chandelier pvalb GABAergic cortical interneuron", "CL:4023036", "pvalb chandelier GABAergic interneuron"),
        # Older than every release cellxgene-ontology-guide ships: from schce's own table of former names.
        (
            "L2/3-6 intratelencephalic projecting glutamatergic cortical neuron",
            "CL:4023040",
            "L2/3-6 intratelencephalic projecting glutamatergic neuron",
        ),
    ],
)
def test_renamed_terms_resolve_through_former_names(embedded, caplog, old_name, term, current_name):
    embedded = pickle.loads(pickle.dumps(embedded))  # a copy that has not warned yet
    assert embedded.name(term) == current_name
    with caplog.at_level(logging.WARNING, logger="schce.ontology"):
        assert embedded.resolve(old_name) == term
    assert any(old_name in r.getMessage() and "earlier CL release" in r.getMessage() for r in caplog.records)


def test_obsolete_name_resolves_to_its_replacement(embedded, caplog):
    embedded = pickle.loads(pickle.dumps(embedded))
    name = "caudal ganglionic eminence derived GABAergic cortical interneuron"
    assert embedded.is_obsolete("CL:4023070") and embedded.replacement("CL:4023070") == "CL:4023064"
    with caplog.at_level(logging.WARNING, logger="schce.ontology"):
        assert embedded.resolve(name) == "CL:4023064"
        assert embedded.resolve("CL:4023070") == "CL:4023064"
    assert any("obsolete term" in r.getMessage() for r in caplog.records)


def test_current_names_win_over_former_ones(embedded):
    # Live names and synonyms come first; the former-name index is only a fallback.
    assert embedded.resolve("T cell") == "CL:0000084"
    assert embedded.resolve("no such cell type at all") is None


def _tiny(consider: dict) -> CellOntology:
    names = {
        "CL:0000000": "cell",
        "CL:0000001": "alpha cell",
        "CL:0000002": "beta cell",
        "CL:0000008": "obsolete gamma cell",
        "CL:0000009": "obsolete delta cell",
    }
    return CellOntology(
        names,
        {"CL:0000001": ["CL:0000000"], "CL:0000002": ["CL:0000000"]},
        obsolete={"CL:0000008": None, "CL:0000009": None},
        consider=consider,
        version="test",
    )


def test_consider_with_one_live_term_is_followed():
    onto = _tiny({"CL:0000008": ["CL:0000001", "PR:000001"], "CL:0000009": ["CL:0000001", "obo.CL_0000002"]})
    assert onto.resolve("CL:0000008") == "CL:0000001"
    assert onto.resolve("gamma cell") == "CL:0000001"  # obsolete name -> its single consider
    # Round trip keeps the consider data.
    assert CellOntology.from_dict(onto.to_dict()).resolve("CL:0000008") == "CL:0000001"


def test_consider_with_several_terms_is_an_error_listing_them():
    onto = _tiny({"CL:0000008": ["CL:0000001"], "CL:0000009": ["CL:0000001", "obo.CL_0000002"]})
    assert onto.resolve("CL:0000009") is None
    with pytest.raises(LabelMappingError) as info:
        onto.map_labels(["CL:0000009", "delta cell", "alpha cell"])
    message = str(info.value)
    assert info.value.unmapped == ["CL:0000009", "delta cell"]
    for line in message.splitlines()[1:3]:
        assert "candidates 'alpha cell' (CL:0000001), 'beta cell' (CL:0000002)" in line


def test_ambiguous_former_name_lists_candidates(monkeypatch):
    import schce._cl_history

    onto = _tiny({})
    monkeypatch.setattr(
        schce._cl_history, "former_name_index", lambda: {"epsilon cell": {"CL:0000001": ["x"], "CL:0000002": ["y"]}}
    )
    assert onto.resolve("Epsilon  Cell") is None
    with pytest.raises(LabelMappingError, match=r"ambiguous former name\): candidates 'alpha cell'.*'beta cell'"):
        onto.map_labels(["epsilon cell"])
    monkeypatch.setattr(schce._cl_history, "former_name_index", lambda: {"epsilon cell": {"CL:0000002": ["y"]}})
    assert onto.resolve("epsilon cell") == "CL:0000002"
