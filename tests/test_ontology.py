import json
import logging
import math
import time
from pathlib import Path

import networkx as nx
import obonet
import pytest
from cellxgene_ontology_guide.supported_versions import CXGSchema
from conftest import shared_file

from schce.ontology import CellOntology, LabelMappingError, load_cell_ontology

FIXTURE = Path(__file__).parent / "data" / "cl_subset.obo"
ROOT = "CL:0000000"
ORPHAN = "CL:0017503"  # basophilic cytoplasm: no is_a parent in the OBO
T_CELL_ANCESTORS = {
    "CL:0000542",
    "CL:0000842",
    "CL:0000226",
    "CL:0000738",
    "CL:0000255",
    "CL:0002242",
    "CL:0000219",
    "CL:0000988",
    ROOT,
}


@pytest.fixture(scope="module")
def embedded() -> CellOntology:
    return load_cell_ontology()


@pytest.fixture(scope="module")
def subset() -> CellOntology:
    return load_cell_ontology(FIXTURE)


def _tiny(**kwargs) -> CellOntology:
    """root <- a <- b, root <- c; with synonyms chosen to test the matching tiers."""
    names = {"CL:0000001": "root", "CL:0000002": "a cell", "CL:0000003": "b cell", "CL:0000004": "c cell"}
    names.update(kwargs.pop("extra_names", {}))
    return CellOntology(
        names,
        {"CL:0000002": ("CL:0000001",), "CL:0000003": ["CL:0000002"], "CL:0000004": ("CL:0000001",)},
        synonyms={
            "CL:0000002": [("shared", "RELATED"), ("alpha", "EXACT"), ("dup", "EXACT")],
            "CL:0000003": [("shared", "EXACT"), ("beta", "NARROW")],
            "CL:0000004": [("dup", "EXACT"), ("c cell", "BROAD"), ("loose", "")],
        },
        version="2000-01-01",
        source="tiny",
        **kwargs,
    )


# ---------------------------------------------------------------------- embedded default


def test_embedded_default_loads_offline_and_is_cached(embedded):
    assert embedded.version == "2026-03-26"
    assert len(embedded) == 3324
    assert len(embedded.terms) == 3324 and list(embedded.terms) == sorted(embedded.terms)
    assert "cellxgene-ontology-guide" in embedded.source and "v2026-03-26" in embedded.source
    assert embedded.name("CL:0000084") == "T cell"
    assert embedded.parents("CL:0000084") == ("CL:0000542",)
    assert embedded.ancestors("CL:0000084") == T_CELL_ANCESTORS
    assert ROOT in embedded.ancestors("CL:0000084")
    assert load_cell_ontology() is embedded
    assert load_cell_ontology(None) is embedded
    assert load_cell_ontology(embedded) is embedded
    assert repr(embedded).startswith("CellOntology(version='2026-03-26', terms=3324, source=")


def test_embedded_closures_equal_the_guides_ancestors(embedded):
    data = CXGSchema().ontology("CL")
    live = [term for term, info in data.items() if not info["deprecated"]]
    assert sorted(live) == list(embedded.terms)
    for term in live:
        assert embedded.ancestors(term) == set(data[term]["ancestors"]), term
    # The orphan's CL:0000000 is at distance 3 in the guide (through classes outside CL): linked directly.
    assert data[ORPHAN]["ancestors"] == {ROOT: 3}
    assert embedded.parents(ORPHAN) == (ROOT,)


def test_embedded_obsolete_and_alt_ids(embedded):
    assert embedded.is_obsolete("CL:0000003") and embedded.replacement("CL:0000003") == ROOT
    assert embedded.is_obsolete("CL:0000002") and embedded.replacement("CL:0000002") is None  # CLO:0000019
    assert embedded.name("CL:0000002") == "obsolete immortal cell line cell"
    # Alternative IDs are deprecated entries without a label in the guide.
    assert not embedded.is_obsolete("CL:0000804")
    assert embedded.resolve("CL:0000804") == "CL:0000084"
    assert embedded.synonyms("CL:0000084") == (
        ("T lymphocyte", "EXACT"),
        ("T-cell", "EXACT"),
        ("T-lymphocyte", "EXACT"),
    )
    # CL:0000073 is replaced by CL:0000215, itself obsolete without replacement.
    assert embedded.replacement("CL:0000073") == "CL:0000215"
    assert embedded.resolve("CL:0000073") is None


# ---------------------------------------------------------------------- vendored OBO subset


def test_fixture_loads(subset):
    assert subset.version == "2026-03-26"
    assert subset.source == str(FIXTURE)
    assert len(subset) == 46
    assert subset.name("CL:0000084") == "T cell"
    assert subset.name("CL:0000003") == "obsolete native cell"
    assert subset.names(["CL:0000236", "CL:0000576"]) == ["B cell", "monocyte"]
    assert "CL:0000084" in subset and "CL:0000003" not in subset and "CL:9999999" not in subset
    assert subset.parents("CL:0000084") == ("CL:0000542",)
    assert subset.parents("CL:0000895") == ("CL:0000624", "CL:0000898")
    assert subset.parents(ROOT) == ()
    assert subset.parents(ORPHAN) == ()
    assert subset.children(ROOT) == ("CL:0000219", "CL:0000255", "CL:0000325", "CL:0000988", "CL:0002242", "CL:0011115")
    assert subset.children("CL:0000576") == ("CL:0000875", "CL:0001054")
    assert subset.ancestors("CL:0000084") == T_CELL_ANCESTORS
    assert subset.ancestors("CL:0000084", include_self=True) == T_CELL_ANCESTORS | {"CL:0000084"}
    assert subset.ancestors("CL:0002396") >= {"CL:0000875", "CL:0001054", "CL:0000576", "CL:0000113", ROOT}
    assert subset.descendants("CL:0000084") == {
        "CL:0000624",
        "CL:0000625",
        "CL:0000789",
        "CL:0000791",
        "CL:0000813",
        "CL:0000815",
        "CL:0000895",
        "CL:0000897",
        "CL:0000898",
        "CL:0000900",
        "CL:0002419",
    }
    assert subset.descendants("CL:0000236") == frozenset()
    assert subset.descendants(ROOT) == set(subset.terms) - {ROOT, ORPHAN}
    assert ("CL:0000542", "CL:0000084") in subset.edges()
    assert len(subset.edges()) == sum(len(subset.parents(t)) for t in subset.terms)
    assert subset.ancestors("CL:0000084") is subset.ancestors("CL:0000084")  # cached


def test_unknown_and_obsolete_terms_raise_clear_key_errors(subset):
    with pytest.raises(KeyError, match="not a term of this Cell Ontology"):
        subset.name("CL:9999999")
    with pytest.raises(KeyError, match="obsolete.*replaced by 'CL:0000000'"):
        subset.parents("CL:0000003")
    with pytest.raises(KeyError, match="alternative ID of 'CL:0000084'"):
        subset.ancestors("CL:0000804")
    with pytest.raises(KeyError):
        subset.replacement("CL:9999999")


def test_resolve_ids_obsolete_and_alt_ids(subset, caplog):
    assert subset.resolve("CL:0000084") == "CL:0000084"
    assert subset.resolve(" CL_0000084 ") == "CL:0000084"
    assert subset.resolve("http://purl.obolibrary.org/obo/CL_0000084") == "CL:0000084"
    assert subset.resolve("CL:0000804") == "CL:0000084"  # alt_id
    assert subset.resolve("CL:0000812") == "CL:0000084"
    # Obsolete with a CL replacement; the warning is logged once, naming both.
    assert subset.is_obsolete("CL:0000003") and subset.replacement("CL:0000003") == ROOT
    with caplog.at_level(logging.WARNING, logger="schce.ontology"):
        assert subset.resolve("CL:0000003") == ROOT
        assert subset.resolve("CL:0000003") == ROOT
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CL:0000003" in warnings[0] and ROOT in warnings[0]
    # Obsolete with a non-CL replacement (CLO:0000019) or none at all.
    assert subset.is_obsolete("CL:0000002") and subset.replacement("CL:0000002") is None
    assert subset.resolve("CL:0000002") is None
    assert subset.resolve("CL:0000215") is None
    assert subset.replacement("CL:0000084") is None
    assert subset.resolve("CL:9999999") is None


def test_resolve_names_and_synonyms(subset):
    assert subset.resolve("T cell") == "CL:0000084"
    assert subset.resolve("t CELL") == "CL:0000084"
    assert subset.resolve("  CD4-positive,   alpha-beta T cell ") == "CL:0000624"
    assert subset.resolve("T lymphocyte") == "CL:0000084"  # EXACT synonym
    assert subset.resolve("immature T cell") == "CL:0000084"  # RELATED synonym
    # 'monocyte' is also a NARROW synonym of CL:0001054, but the label wins.
    assert subset.resolve("Monocyte") == "CL:0000576"
    assert subset.resolve("CD16 monocyte") is None
    assert subset.resolve("obsolete native cell") is None  # the 'obsolete' prefix is not part of the name
    assert subset.resolve("native cell") == ROOT  # the name of obsolete CL:0000003 leads to its replacement
    assert subset.resolve("") is None
    assert subset.resolve(None) is None  # type: ignore[arg-type]


def test_resolve_tiers_and_ambiguity():
    onto = _tiny()
    assert onto.resolve("b cell") == "CL:0000003"
    assert onto.resolve("shared") == "CL:0000003"  # EXACT beats RELATED
    assert onto.resolve("alpha") == "CL:0000002"
    assert onto.resolve("beta") == "CL:0000003"
    assert onto.resolve("loose") == "CL:0000004"  # unknown scope still matches in the last tier
    assert onto.resolve("dup") is None  # EXACT synonym of two terms: ambiguous
    assert onto.resolve("c cell") == "CL:0000004"
    assert onto.synonyms("CL:0000004") == (("dup", "EXACT"), ("c cell", "BROAD"), ("loose", ""))


def test_map_labels(subset):
    values = ["T cell", "monocyte", None, float("nan"), "T cell", "CL:0000236", "CL:0000804"]
    assert subset.map_labels(values) == {
        "T cell": "CL:0000084",
        "monocyte": "CL:0000576",
        "CL:0000236": "CL:0000236",
        "CL:0000804": "CL:0000084",
    }
    assert subset.map_labels([]) == {}
    with pytest.raises(TypeError, match="must be strings"):
        subset.map_labels(["T cell", 3])


def test_map_labels_error_lists_all_unmapped_with_close_names(subset):
    with pytest.raises(LabelMappingError) as info:
        subset.map_labels(["T cell", "CD16 monocyte", "Tcells", "zzzz", "CL:0000002", "T cell", math.nan])
    err = info.value
    assert isinstance(err, ValueError)
    assert err.unmapped == ["CD16 monocyte", "CL:0000002", "Tcells", "zzzz"]
    message = str(err)
    assert message.startswith("4 of 5 cell-type labels could not be mapped")
    lines = message.splitlines()
    for value in err.unmapped:
        assert sum(f"- {value!r}" in line for line in lines) == 1, value
    line = next(line for line in lines if "'CD16 monocyte'" in line)
    assert "'monocyte' (CL:0000576)" in line
    line = next(line for line in lines if "'Tcells'" in line)
    assert "'T cell' (CL:0000084)" in line
    line = next(line for line in lines if "'CL:0000002'" in line)
    assert "obsolete" in line
    assert "no close CL names" in next(line for line in lines if "'zzzz'" in line)
    assert "'CL:0000084'" in message and "ontology=" in message and "2026-03-26" in message


def test_label_mapping_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(LabelMappingError("boom", ["a"])))
    assert str(err) == "boom"


def test_fixture_closures_equal_embedded(subset, embedded):
    # Same release: names, EXACT synonyms and closures agree, except the orphan that the guide puts under the root.
    for term in subset.terms:
        assert subset.name(term) == embedded.name(term)
        assert {s for s, scope in subset.synonyms(term) if scope == "EXACT"} == {s for s, _ in embedded.synonyms(term)}
        if term == ORPHAN:
            assert subset.ancestors(term) == frozenset()
            assert embedded.ancestors(term) == {ROOT}
        else:
            assert subset.ancestors(term) == embedded.ancestors(term), term
    assert embedded.subset(set(subset.terms) - {ORPHAN}).edges() == [
        edge for edge in subset.edges() if ORPHAN not in edge
    ]


# ---------------------------------------------------------------------- full OBO release


def test_full_obo_matches_embedded_except_documented_differences(embedded):
    full_obo = shared_file("ontology", "cl-2026-03-26.obo")
    start = time.perf_counter()
    full = load_cell_ontology(full_obo)
    assert full.version == "2026-03-26"
    assert len(full) == 3324
    assert full.terms == embedded.terms
    assert len(full.edges()) == 4630
    assert full.resolve("CL:0000804") == "CL:0000084"
    assert ("T lymphocyte", "EXACT") in full.synonyms("CL:0000084")

    graph = obonet.read_obo(full_obo, ignore_obsolete=False)
    # is_a plus part_of, child -> parent, among live CL terms: what the guide's closure also follows.
    up = nx.DiGraph(
        (child, parent)
        for child, parent, rel in graph.edges(keys=True)
        if rel in {"is_a", "BFO:0000050"} and child in full and parent in full
    )
    orphans = {term for term in full.terms if not full.parents(term)} - {ROOT}
    assert ORPHAN in orphans

    differing = []
    for term in full.terms:
        obo, emb = full.ancestors(term), embedded.ancestors(term)
        assert obo <= emb, term
        extra = emb - obo
        if not extra:
            continue
        differing.append(term)
        via_part_of = nx.descendants(up, term) if term in up else set()
        for ancestor in extra:
            orphan_below = bool(full.ancestors(term, include_self=True) & orphans)
            assert (ancestor == ROOT and orphan_below) or ancestor in via_part_of, (term, ancestor)
    assert len(differing) == 18, differing
    assert {"CL:0002453", "CL:4052024", "CL:4052025", ORPHAN} <= set(differing)
    assert time.perf_counter() - start < 20


# ---------------------------------------------------------------------- errors


def test_cycle_raises_naming_it(tmp_path):
    path = tmp_path / "cycle.obo"
    path.write_text(
        "format-version: 1.2\nontology: cl\n\n"
        "[Term]\nid: CL:0000001\nname: one\nis_a: CL:0000002 ! two\n\n"
        "[Term]\nid: CL:0000002\nname: two\nis_a: CL:0000001 ! one\n\n"
        "[Term]\nid: CL:0000003\nname: three\nis_a: CL:0000001 ! one\n"
    )
    with pytest.raises(ValueError, match="CL:0000001 -> CL:0000002 -> CL:0000001") as info:
        load_cell_ontology(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="cycle: CL:0000005 -> CL:0000005"):
        CellOntology({"CL:0000005": "self"}, {"CL:0000005": ("CL:0000005",)})


def test_bad_files_raise(tmp_path):
    missing = tmp_path / "missing.obo"
    with pytest.raises(FileNotFoundError, match="missing.obo"):
        load_cell_ontology(missing)
    csv = tmp_path / "labels.csv"
    csv.write_text("cell,label\n1,T cell\n")
    with pytest.raises(ValueError, match=r"labels\.csv.*not a readable OBO file"):
        load_cell_ontology(csv)
    go = tmp_path / "go.obo"
    go.write_text("format-version: 1.2\nontology: go\n\n[Term]\nid: GO:0005623\nname: cell\n")
    with pytest.raises(ValueError, match=r"go\.obo contains no Cell Ontology terms"):
        load_cell_ontology(str(go))
    with pytest.raises(TypeError):
        load_cell_ontology(42)  # type: ignore[arg-type]


def test_obo_header_version_fallbacks(tmp_path):
    term = "\n[Term]\nid: CL:0000001\nname: one\n"
    path = tmp_path / "a.obo"
    path.write_text("format-version: 1.2\ndata-version: my-build\nontology: cl\n" + term)
    assert load_cell_ontology(path).version == "my-build"
    path.write_text("format-version: 1.2\ndate: 26:03:2026 12:00\nontology: cl\n" + term)
    assert load_cell_ontology(path).version == "26:03:2026 12:00"
    path.write_text("format-version: 1.2\nontology: cl\n" + term)
    assert load_cell_ontology(path).version == "unknown"


def test_constructor_validates():
    with pytest.raises(ValueError, match="not live terms"):
        CellOntology({"CL:0000001": "a"}, {"CL:0000001": ("CL:0000002",)})
    with pytest.raises(ValueError, match="not a live term"):
        CellOntology({"CL:0000001": "a"}, {"CL:0000002": ()})
    with pytest.raises(ValueError, match="unknown scopes"):
        CellOntology({"CL:0000001": "a"}, {}, synonyms={"CL:0000001": [("x", "WIDE")]})
    with pytest.raises(ValueError, match="not a term"):
        CellOntology({"CL:0000001": "a"}, {}, alt_ids={"CL:0000009": "CL:0000008"})
    onto = CellOntology({"CL:0000001": "a", "CL:0000002": "b"}, {"CL:0000002": "CL:0000001"})
    assert onto.parents("CL:0000002") == ("CL:0000001",)
    assert onto.version == "unknown" and onto.source == ""


# ---------------------------------------------------------------------- round trips


def test_to_dict_from_dict_round_trip(subset):
    data = json.loads(json.dumps(subset.to_dict()))
    assert data["format"] == "schce.CellOntology" and data["version"] == "2026-03-26"
    again = CellOntology.from_dict(data)
    assert again == subset and hash(again) == hash(subset)
    assert again.to_dict() == subset.to_dict()
    assert again.terms == subset.terms and again.edges() == subset.edges()
    assert again.source == subset.source
    assert again.resolve("CL:0000804") == "CL:0000084"
    assert again.replacement("CL:0000003") == ROOT
    assert again.synonyms("CL:0000084") == subset.synonyms("CL:0000084")
    tiny = _tiny(obsolete={"CL:0000009": "CL:0000002"}, extra_names={"CL:0000009": "old"})
    assert CellOntology.from_dict(tiny.to_dict()) == tiny
    with pytest.raises(ValueError, match="Not a saved CellOntology"):
        CellOntology.from_dict({"format": "other", "names": {}})
    with pytest.raises(ValueError, match="newer than this schce supports"):
        CellOntology.from_dict({**data, "format_version": 99})


def test_subset_round_trip(subset, embedded):
    small = subset.subset(["CL:0000624", "CL:0000236"])
    expected = subset.ancestors("CL:0000624", include_self=True) | subset.ancestors("CL:0000236", include_self=True)
    assert set(small.terms) == expected
    assert small.version == subset.version and "subset" in small.source
    for term in small.terms:
        assert small.parents(term) == subset.parents(term)
        assert small.ancestors(term) == subset.ancestors(term)
        assert small.name(term) == subset.name(term)
    assert small.descendants("CL:0000084") == {"CL:0000789", "CL:0000791", "CL:0002419", "CL:0000624"}
    assert small.resolve("CL:0000804") == "CL:0000084"  # alt_ids of kept terms are kept
    assert small.resolve("CL:0000003") == ROOT  # obsolete terms replaced by kept terms too
    assert not small.is_obsolete("CL:0000002")
    assert small.subset(small.terms) == small
    assert CellOntology.from_dict(small.to_dict()) == small
    # The same subset from the embedded release has the same hierarchy.
    assert embedded.subset(["CL:0000624", "CL:0000236"]).edges() == small.edges()
    with pytest.raises(KeyError):
        subset.subset(["CL:9999999"])
