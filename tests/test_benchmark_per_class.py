"""The per-label summary behind the real-data benchmark's ``--per-class`` lines: fold means, then seeds."""

from __future__ import annotations

import pandas as pd
from _private import COARSEN, leave_one_batch_out, per_label_summary


def test_per_label_summary_averages_folds_then_seeds():
    # label -> [(corrected F1, test cells)] per fold; the rare label is in the test set of one fold per seed only
    seeds = [
        {"CL:1": [(1.0, 10), (0.5, 20)], "CL:2": [(0.0, 2)]},
        {"CL:1": [(0.5, 10), (0.0, 20)], "CL:2": [(1.0, 4)]},
    ]
    table = per_label_summary(seeds)
    # seeds' fold means 0.75 and 0.25: mean 0.5, sd 0.25, 15 cells per fold; the rare label: 0 and 1, 3 cells
    want = pd.DataFrame({"mean": [0.5, 0.5], "sd": [0.25, 0.5], "cells": [15.0, 3.0]}, index=["CL:1", "CL:2"])
    pd.testing.assert_frame_equal(table, want, rtol=1e-12)


def test_per_label_summary_label_missing_from_a_seed():
    table = per_label_summary([{"CL:9": [(0.25, 1)]}, {}])
    assert list(table.index) == ["CL:9"]
    assert table.loc["CL:9"].tolist() == [0.25, 0.0, 1.0]


def test_leave_one_batch_out_coarsens_only_the_larger_training_batch():
    import anndata as ad
    import numpy as np

    obs = pd.DataFrame(
        {
            "batch": ["a"] * 4 + ["b"] * 2 + ["c"] * 3,
            "cell_type_ontology_term_id": ["CL:0000624", "CL:0000236", "CL:0001054", "CL:0000624"]
            + ["CL:0000625", "CL:0002396"]
            + ["CL:0000624", "CL:0000625", "CL:0000236"],
        },
        index=[f"c{i}" for i in range(9)],
    )
    adata = ad.AnnData(np.ones((9, 2), dtype=np.float32), obs=obs)
    folds = {batch: (train, test) for batch, train, test in leave_one_batch_out(adata, mixed=True)}
    assert sorted(folds) == ["a", "b", "c"]
    train, test = folds["c"]  # a (4 cells) is the larger training batch: only its labels are coarsened
    assert list(train.obs["training_label"]) == [
        COARSEN["CL:0000624"],
        "CL:0000236",
        COARSEN["CL:0001054"],
        COARSEN["CL:0000624"],
        "CL:0000625",
        "CL:0002396",
    ]
    assert list(test.obs["cell_type_ontology_term_id"]) == ["CL:0000624", "CL:0000625", "CL:0000236"]
    train, _ = folds["a"]  # c is larger than b here
    assert list(train.obs["training_label"]) == ["CL:0000625", "CL:0002396", "CL:0000084", "CL:0000084", "CL:0000236"]
