"""The data-module contract: every data path implements it, and training reads nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _private import split_cells
from conftest import SMALL_MLP

import schce
from schce.data import AnnDataModule, HCEDataModule, SCTabStoreDataModule, balanced_class_weights, write_sctab_store
from schce.nn import densify


def _module(adata, model, batch_size=64, seed=0):
    codes = model.hierarchy.label_index(adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy())
    train, val, _ = split_cells(codes, 0.1, 0.0, seed)
    return AnnDataModule(adata.X, codes, model.hierarchy.labels, train, val, batch_size=batch_size, seed=seed)


def test_balanced_class_weights():
    w = balanced_class_weights(np.array([6, 0, 2, 4]))
    # N / (K · n_c) with N = 12 cells, K = 3 labels present; absent labels weigh 0
    np.testing.assert_allclose(w, [12 / 18, 0.0, 12 / 6, 12 / 12], rtol=1e-12)


def test_anndata_and_store_modules_implement_the_contract(pbmc, tmp_path):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    dm = _module(adata, model)
    assert isinstance(dm, HCEDataModule)
    assert dm.n_genes == adata.n_vars and dm.n_values == adata.n_obs * adata.n_vars and dm.n_batches == 1
    assert dm.n_cells("train") + dm.n_cells("val") == adata.n_obs and dm.n_cells("test") == 0
    assert dm.label_counts("train").sum() == dm.n_cells("train")
    batch = next(iter(dm.train_dataloader()))
    assert densify(batch).shape == (64, adata.n_vars) and batch["y"].dtype == torch.int64
    with pytest.raises(ValueError, match="split must be one of"):
        dm.n_cells("validation")
    store = write_sctab_store(adata, tmp_path / "s", labels_key="cell_type_ontology_term_id", rows_per_part=1024)
    sdm = SCTabStoreDataModule(store, num_workers=0)
    assert isinstance(sdm, HCEDataModule)
    assert sdm.n_batches == 1 and sdm.n_values is None and sdm.resumable_order() is None
    masks = sdm.annotation_targets(model.hierarchy, "auto")  # one source here: one mask per used label
    used = (sdm.label_counts("train") + sdm.label_counts("val")) > 0
    assert masks.shape == (used.sum(), model.hierarchy.n_labels) and masks.any(axis=1).all()


def test_training_on_an_anndata_module_is_training_on_the_registered_cells(pbmc):
    """train() builds an AnnDataModule itself: handing it the same module gives the same model."""
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    registered = schce.HCEClassifier(adata, **SMALL_MLP)
    registered.train(max_epochs=2, batch_size=64, seed=0, enable_progress_bar=False)
    given = schce.HCEClassifier(adata, **SMALL_MLP)
    given.train(datamodule=_module(adata, given), max_epochs=2, seed=0, enable_progress_bar=False)
    for key, value in registered.module.state_dict().items():
        torch.testing.assert_close(given.module.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(given.temperature_, registered.temperature_, rtol=1e-6)


def test_a_module_missing_members_is_refused_before_training(pbmc):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, loss="hce", **SMALL_MLP)

    class Loaders:
        def train_dataloader(self):
            return []

        def val_dataloader(self):
            return []

    with pytest.raises(TypeError, match="lacks .*n_genes"):
        model.train(datamodule=Loaders(), max_epochs=1)
    assert not model.is_trained_


def test_each_data_path_refuses_the_train_options_it_cannot_serve(pbmc, tmp_path):
    """train() has one path: the data module (registered AnnData, store) names the option it cannot serve."""
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    with pytest.raises(ValueError, match="no batch_key was registered: call HCEClassifier.setup_anndata"):
        model.train(max_epochs=1, adversarial_weight=0.1)
    with pytest.raises(ValueError, match="augment=True learns batch shifts .* pass split_key"):
        model.train(max_epochs=1, augment=True)
    with pytest.raises(KeyError, match="split_key='donor' is not a column of adata.obs"):
        model.train(max_epochs=1, split_key="donor")
    one_batch = pbmc.copy()
    one_batch.obs["batch"] = "only"
    schce.HCEClassifier.setup_anndata(one_batch, labels_key="cell_type_ontology_term_id", batch_key="batch")
    with pytest.raises(ValueError, match="The data has 1 batch; the batch terms .* need at least two"):
        schce.HCEClassifier(one_batch, **SMALL_MLP).train(max_epochs=1, batch_mixing_weight=0.1)
    store = write_sctab_store(adata, tmp_path / "s", labels_key="cell_type_ontology_term_id", rows_per_part=1024)
    sdm = SCTabStoreDataModule(store, num_workers=0)
    on_store = schce.HCEClassifier.from_sctab_store(store, **SMALL_MLP)
    with pytest.raises(ValueError, match="augment=True builds the matrix .* SCTabStoreDataModule streams"):
        on_store.train(datamodule=sdm, max_epochs=1, augment=True)
    with pytest.raises(ValueError, match="The data has 1 batch"):
        on_store.train(datamodule=sdm, max_epochs=1, adversarial_weight=0.1)
    assert not model.is_trained_ and not on_store.is_trained_
    # split groups stand in for batches when augment=True learns shifts (the registered path, one rule)
    dm = _module(adata, model)
    dm.groups = np.asarray(adata.obs["cell_type"].astype(str))
    dm.check_train_options(batch_terms=False, augment=True)  # does not raise
