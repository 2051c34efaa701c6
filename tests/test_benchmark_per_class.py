"""The real-data benchmark's per-class lines (``--per-class``): fold means, then mean ± sd over seeds."""

from __future__ import annotations

from _private import per_class_lines


def test_per_class_lines_average_folds_then_seeds():
    # label -> [(corrected F1, test cells)] per fold; the rare label is in the test set of one fold per seed only
    seeds = [
        {"CL:1": [(1.0, 10), (0.5, 20)], "CL:2": [(0.0, 2)]},
        {"CL:1": [(0.5, 10), (0.0, 20)], "CL:2": [(1.0, 4)]},
    ]
    lines = per_class_lines("task", "m", seeds, {"CL:1": "B cell", "CL:2": "hematopoietic stem cell"})
    assert len(lines) == 2
    b_cell, hsc = lines  # sorted by display name
    # seeds' fold means 0.75 and 0.25: mean 0.5, sd 0.25; 15 cells per fold
    assert "B cell" in b_cell and "corrected F1 0.500 ± 0.250 | 15 test cells per fold" in b_cell
    assert "hematopoietic stem cell" in hsc and "corrected F1 0.500 ± 0.500 | 3 test cells per fold" in hsc


def test_per_class_lines_name_falls_back_to_term():
    (line,) = per_class_lines("task", "m", [{"CL:9": [(0.25, 1)]}], {})
    assert "CL:9" in line and "corrected F1 0.250 ± 0.000 | 1 test cells per fold" in line
