"""Issue 24: a failed set-up leaves obs as it was; training refuses a registration that changed under the model."""

from __future__ import annotations

import numpy as np
import pytest

import schce

from .conftest import SMALL_MLP, assert_unchanged, snapshot

LABELS = "cell_type_ontology_term_id"


def test_missing_batch_values_are_named_and_obs_is_left_alone(pbmc_copy):
    adata = pbmc_copy
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2, "a", "b")
    adata.obs.loc[adata.obs_names[[4, 9]], "batch"] = np.nan
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"obs\['batch'\] has 2 missing value\(s\) \(NaN\), in cells .*Fill them"):
        schce.HCEClassifier.setup_anndata(adata, labels_key=LABELS, batch_key="batch")
    assert_unchanged(adata, before)
    assert not [c for c in adata.obs.columns if c.startswith("_scvi")]


def test_a_users_scvi_named_column_is_not_overwritten(pbmc_copy):
    adata = pbmc_copy
    adata.obs["_scvi_labels"] = "mine"
    with pytest.raises(ValueError, match=r"\['_scvi_labels'\], which scvi-tools' set-up would overwrite"):
        schce.HCEClassifier.setup_anndata(adata, labels_key=LABELS)
    assert (adata.obs["_scvi_labels"] == "mine").all()


def test_setting_up_twice_is_fine_but_training_an_older_model_is_refused(pbmc_copy):
    adata = pbmc_copy
    schce.HCEClassifier.setup_anndata(adata, labels_key=LABELS)
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type")  # scvi's own columns: allowed again
    with pytest.raises(RuntimeError, match="setup_anndata was called again on this AnnData after the model was built"):
        model.train(max_epochs=1, enable_progress_bar=False)
    assert not model.is_trained_


def test_labels_edited_after_setup_are_refused(pbmc_copy):
    adata = pbmc_copy
    schce.HCEClassifier.setup_anndata(adata, labels_key=LABELS)
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    labels = adata.obs[LABELS].astype(str).to_numpy().copy()
    labels[:3] = labels[::-1][:3]
    changed = int((labels != adata.obs[LABELS].astype(str).to_numpy()).sum())
    adata.obs[LABELS] = labels
    with pytest.raises(RuntimeError, match=rf"changed for {changed} cell\(s\) .* after setup_anndata"):
        model.train(max_epochs=1, enable_progress_bar=False)
