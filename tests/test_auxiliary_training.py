"""Auxiliary single-cell losses added to HCE training through HCEClassifier.train."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SMALL_MLP

import schce


@pytest.fixture
def with_batches(pbmc):
    adata = pbmc.copy()
    # two pseudo-batches, alternating, so every label is in both
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "b0", "b1")
    return adata


def test_each_term_is_logged_and_changes_training(with_batches):
    adata = with_batches
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id", batch_key="batch")
    plain = schce.HCEClassifier(adata, **SMALL_MLP)
    plain.train(max_epochs=2, seed=0, enable_progress_bar=False)
    assert "train_task_loss" not in plain.history

    model = schce.HCEClassifier(adata, **SMALL_MLP)
    model.train(
        max_epochs=2, seed=0, enable_progress_bar=False, adversarial_weight=1.0, batch_mixing_weight=0.5, ecs_weight=0.1
    )
    h = model.history
    for key in ("train_adversarial_loss", "train_batch_mixing_loss", "train_ecs_loss", "train_task_loss"):
        assert key in h and np.isfinite(h[key].to_numpy()).all()
    # adversarial CE for 2 balanced batches starts near log 2; batch mixing lies in [-log 2, 0]
    assert 0.3 < h["train_adversarial_loss"].iloc[0, 0] < 1.5
    assert -np.log(2) - 1e-6 <= h["train_batch_mixing_loss"].iloc[0, 0] <= 0
    total = h["train_loss"].to_numpy().ravel()
    parts = (
        h["train_task_loss"].to_numpy().ravel()
        + h["train_adversarial_loss"].to_numpy().ravel()
        + 0.5 * h["train_batch_mixing_loss"].to_numpy().ravel()
        + 0.1 * h["train_ecs_loss"].to_numpy().ravel()
    )
    np.testing.assert_allclose(total, parts, rtol=1e-4)  # epoch means of a sum are sums of epoch means
    # the classifier's weights differ from plain HCE training with the same seed
    a, b = plain.module.state_dict(), model.module.state_dict()
    assert any(bool((a[k] != b[k]).any()) for k in a if a[k].is_floating_point())
    # the discriminator is not part of the saved classifier
    assert set(a) == set(b)


def test_batch_terms_need_a_registered_batch_key(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(pbmc_copy, **SMALL_MLP)
    with pytest.raises(ValueError, match="batch_key"):
        model.train(max_epochs=1, adversarial_weight=1.0)
    with pytest.raises(ValueError, match="batch_key"):
        model.train(max_epochs=1, batch_mixing_weight=1.0)
    # ECS needs no batches
    model.train(max_epochs=1, ecs_weight=0.5, enable_progress_bar=False)
    assert "train_ecs_loss" in model.history


def test_negative_weight_is_rejected(with_batches):
    schce.HCEClassifier.setup_anndata(with_batches, labels_key="cell_type_ontology_term_id", batch_key="batch")
    model = schce.HCEClassifier(with_batches, **SMALL_MLP)
    with pytest.raises(ValueError, match="non-negative"):
        model.train(max_epochs=1, ecs_weight=-1.0)
