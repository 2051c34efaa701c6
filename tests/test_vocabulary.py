"""Free-text labels to CL terms: proposals with their reasons, user mappings from dicts, tables and CSV files."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from schce.ontology import LabelMappingError, load_cell_ontology
from schce.vocabulary import _ABBREVIATIONS, map_labels, propose_label_mapping, read_label_mapping

SYMPHONY_LABELS = {  # symphony's free-text obs["cell_type"] and the CL terms its curators gave the same cells
    "B": "CL:0000236",
    "T_CD8": "CL:0000625",
    "T_CD4": "CL:0000624",
    "DC": "CL:0000451",
    "MK": "CL:0000556",
    "Mono_CD14": "CL:0001054",
    "NK": "CL:0000623",
    "Mono_CD16": "CL:0002396",
    "HSC": "CL:0000037",
}


def test_every_abbreviation_is_a_live_term_of_the_embedded_ontology():
    onto = load_cell_ontology()
    for key, term in _ABBREVIATIONS.items():
        assert onto.resolve(term) == term, key


def test_proposals_for_symphony_labels_match_the_curated_terms():
    table = propose_label_mapping(list(SYMPHONY_LABELS))
    assert list(table.columns) == ["label", "ontology_term_id", "name", "how", "candidates"]
    assert dict(zip(table["label"], table["ontology_term_id"], strict=True)) == SYMPHONY_LABELS
    assert set(table["how"]) == {"abbreviation"}
    assert table.set_index("label").loc["Mono_CD16", "name"] == "CD14-low, CD16-positive monocyte"


def test_proposals_say_how_they_were_found_and_warn_about_guesses(caplog):
    with caplog.at_level(logging.WARNING, logger="schce.vocabulary"):
        table = propose_label_mapping(["T cell", "CL:0000236", "cd4+ naive T cells", "macrophag", "zzz", None, "zzz"])
    rows = table.set_index("label")
    assert list(rows.index) == ["T cell", "CL:0000236", "cd4+ naive T cells", "macrophag", "zzz"]
    assert rows.loc["T cell", ["ontology_term_id", "how"]].tolist() == ["CL:0000084", "ontology"]
    assert rows.loc["CL:0000236", "how"] == "ontology"
    assert rows.loc["cd4+ naive T cells", ["ontology_term_id", "how"]].tolist() == ["CL:0000895", "abbreviation"]
    assert rows.loc["macrophag", ["ontology_term_id", "how"]].tolist() == ["CL:0000235", "close name"]
    assert "M1 macrophage (CL:0000863)" in rows.loc["macrophag", "candidates"]
    assert rows.loc["zzz", ["ontology_term_id", "how"]].tolist() == ["", "none"]
    assert "Check these proposals before training" in caplog.text and "macrophag, zzz" in caplog.text


def test_read_label_mapping_from_dict_table_and_csv(tmp_path):
    table = propose_label_mapping(["B", "NK"])
    want = {"B": "CL:0000236", "NK": "CL:0000623"}
    assert read_label_mapping(table) == want
    path = tmp_path / "mapping.csv"
    table.to_csv(path, index=False)
    assert read_label_mapping(path) == want
    assert read_label_mapping({"B": "B cell"}) == {"B": "B cell"}
    with pytest.raises(ValueError, match="needs the columns 'label' and 'ontology_term_id'; missing"):
        read_label_mapping(pd.DataFrame({"label": ["B"], "cl": ["CL:0000236"]}))
    with pytest.raises(ValueError, match=r"lists labels twice: \['B'\]"):
        read_label_mapping(pd.DataFrame({"label": ["B", "B"], "ontology_term_id": ["CL:0000236", "CL:0000084"]}))
    with pytest.raises(FileNotFoundError, match="No label mapping file"):
        read_label_mapping(tmp_path / "absent.csv")


def test_map_labels_uses_the_mapping_first_then_the_ontology(caplog):
    onto = load_cell_ontology()
    got = map_labels(["T_CD4", "B cell", "T_CD4", "NK"], onto, {"T_CD4": "CL:0000624", "NK": "natural killer cell"})
    assert got == {"T_CD4": "CL:0000624", "B cell": "CL:0000236", "NK": "CL:0000623"}
    with caplog.at_level(logging.WARNING, logger="schce.vocabulary"):
        map_labels(["B cell"], onto, {"Mono": "CL:0000576"})
    assert "entries for labels no cell carries: Mono" in caplog.text


def test_map_labels_names_every_problem():
    onto = load_cell_ontology()
    with pytest.raises(LabelMappingError, match=r"'T_CD4' -> 'CL:9999999': not a live term") as err:
        map_labels(["T_CD4", "Mono_CD14"], onto, {"T_CD4": "CL:9999999"})
    assert "Mono_CD14" in str(err.value)  # the label outside the mapping is listed too
    with pytest.raises(LabelMappingError, match=r"propose_label_mapping\(labels\)"):
        map_labels(["T_CD4"], onto)
