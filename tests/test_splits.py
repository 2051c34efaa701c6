from __future__ import annotations

import numpy as np
import pytest
from _private import group_split, split_cells
from conftest import SMALL_MLP

import schce


def test_group_split_keeps_groups_whole_and_reaches_the_sizes():
    groups = np.repeat(np.array([f"donor{i}" for i in range(10)]), [50, 40, 30, 30, 20, 20, 10, 10, 5, 5])
    train, val, test = group_split(groups, 0.2, 0.1, seed=0)
    assert len(train) + len(val) + len(test) == len(groups)
    sets = [set(groups[idx]) for idx in (train, val, test)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert len(val) >= 0.2 * len(groups) and len(test) >= 0.1 * len(groups)
    again = group_split(groups, 0.2, 0.1, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    # with two groups a validation split still leaves one to train on
    tr, va, te = group_split(np.array(["a"] * 5 + ["b"] * 5), 0.9, 0.0, seed=1)
    assert len(tr) == 5 and len(va) == 5 and len(te) == 0
    with pytest.raises(ValueError, match="at least 3 groups"):
        group_split(np.array(["a", "b"]), 0.1, 0.1, seed=0)


def test_random_split_is_stratified_with_a_test_set():
    labels = np.repeat(np.arange(4), 50)
    train, val, test = split_cells(labels, 0.1, 0.2, seed=0)
    assert len(test) == 40 and len(val) == 20 and len(train) == 140
    for idx in (train, val, test):
        assert set(labels[idx]) == {0, 1, 2, 3}
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    with pytest.raises(ValueError, match="below 1"):
        split_cells(labels, 0.6, 0.5, seed=0)


def test_train_with_split_key_stores_and_saves_indices(pbmc_copy, tmp_path):
    adata = pbmc_copy
    adata.obs["donor"] = np.array([f"d{i % 7}" for i in range(adata.n_obs)])
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    with pytest.raises(KeyError, match="split_key='sample'"):
        model.train(max_epochs=1, split_key="sample")
    model.train(max_epochs=1, seed=0, split_key="donor", validation_size=0.2, test_size=0.1, enable_progress_bar=False)
    donors = adata.obs["donor"].to_numpy()
    parts = [set(donors[idx]) for idx in (model.train_indices, model.validation_indices, model.test_indices)]
    assert all(parts) and not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.test_indices, model.test_indices)
    np.testing.assert_array_equal(loaded.validation_indices, model.validation_indices)
