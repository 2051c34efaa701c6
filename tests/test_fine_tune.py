"""Fine-tuning a trained, loaded or published model on new labelled cells, with new labels added as outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL_MLP
from test_sctab_checkpoint import SMALL, _write_store

import schce
from schce.nn import HCEModule, extend_head, make_backbone, output_layer

LABELS = "cell_type_ontology_term_id"
TREG = "CL:0000815"  # regulatory T cell: left out of the first training so fine-tuning meets it as a new label


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_same_state(model, before: dict) -> None:
    after = model.module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0, msg=k)  # untouched values, not recomputed


@pytest.fixture(scope="module")
def without_treg(pbmc, tmp_path_factory):
    """A small model trained without regulatory T cells, saved; load a fresh copy per test."""
    train = pbmc[pbmc.obs[LABELS] != TREG].copy()
    schce.HCEClassifier.setup_anndata(train, labels_key=LABELS)
    model = schce.HCEClassifier(train, **SMALL_MLP)
    model.train(max_epochs=4, seed=0, enable_progress_bar=False)
    path = tmp_path_factory.mktemp("model") / "no_treg"
    model.save(path)
    return path


@pytest.mark.parametrize("backbone", ["linear", "mlp", "tabnet"])
def test_extend_head_keeps_old_rows_and_their_logits(backbone):
    torch.manual_seed(0)
    net = HCEModule(make_backbone(backbone, 20, 5, **SMALL[backbone])).eval()
    x = torch.rand(16, 20) * 10
    head = output_layer(net.classifier)
    w_old = head.weight.detach().clone()
    logits_old, _ = net(x)
    extend_head(net.classifier, 3)
    logits_new, _ = net(x)
    assert head.out_features == 8 and logits_new.shape == (16, 8) and head.weight.shape[0] == 8
    torch.testing.assert_close(head.weight[:5], w_old, rtol=0, atol=0)  # the old rows are copied, not recomputed
    # Old labels: the same logits up to the matmul's rounding (a wider product may use another kernel on some CPUs),
    # so the same argmax among them and the same probabilities relative to each other.
    torch.testing.assert_close(logits_new[:, :5], logits_old, rtol=1e-5, atol=1e-5)
    assert (logits_new[:, :5].argmax(1) == logits_old.argmax(1)).all()
    torch.testing.assert_close(torch.softmax(logits_new[:, :5], 1), torch.softmax(logits_old, 1))
    assert head.weight.requires_grad and bool(head.weight[5:].abs().sum() > 0)
    assert extend_head(net.classifier, 0) is net.classifier and head.out_features == 8


def test_fine_tune_adds_a_label_and_keeps_the_old_outputs(pbmc, without_treg, tmp_path):
    model = schce.HCEClassifier.load(without_treg)
    old_labels = model.hierarchy.labels
    # Long enough for the new output row to win some cells (the best epoch is kept; at epoch 0 it wins none).
    added = model.fine_tune(pbmc, LABELS, max_epochs=10, seed=0, enable_progress_bar=False)
    assert added == [TREG]
    assert model.hierarchy.labels == (*old_labels, TREG)  # old labels keep their output indices
    assert "CL:0000084" in model.hierarchy.ancestors(TREG)  # T cell: placed by the ontology
    assert "11 labels" not in repr(model) and f"{len(old_labels) + 1} labels" in repr(model)
    query = pbmc.copy()
    model.predict(query)
    assert list(query.obsm["schce_probabilities"].columns) == [*old_labels, TREG]
    assert (query.obs["schce_prediction_ontology_term_id"] == TREG).any()
    # Saved and loaded, the grown model predicts the same.
    model.save(tmp_path / "tuned")
    again = schce.HCEClassifier.load(tmp_path / "tuned")
    assert again.hierarchy.labels == model.hierarchy.labels
    assert again.setup_state.fine_tuning == [{"n_cells": pbmc.n_obs, "labels_added": [TREG], "freeze_encoder": False}]
    np.testing.assert_allclose(
        again.predict(pbmc.copy(), inplace=False)["schce_confidence"], query.obs["schce_confidence"], atol=1e-6
    )
    # Deterministic under the seed.
    other = schce.HCEClassifier.load(without_treg)
    other.fine_tune(pbmc, LABELS, max_epochs=10, seed=0, enable_progress_bar=False)
    _assert_same_state(other, _state(model))


def test_fine_tune_on_known_labels_improves_and_aligns_genes(pbmc, without_treg):
    model = schce.HCEClassifier.load(without_treg)
    known = pbmc[pbmc.obs[LABELS] != TREG]
    # Genes in another order, a third of them missing: aligned to the model's and zero-filled.
    rng = np.random.default_rng(0)
    cells = known[:, rng.permutation(known.n_vars)[: 2 * known.n_vars // 3]].copy()
    before = model.evaluate(cells, LABELS)["corrected_accuracy"]
    assert model.fine_tune(cells, LABELS, max_epochs=8, seed=0, enable_progress_bar=False) == []
    assert model.hierarchy.n_labels == 9
    assert model.evaluate(cells, LABELS)["corrected_accuracy"] > before + 0.02


def test_new_labels_error_and_bad_input_leave_the_model_unchanged(pbmc, without_treg):
    model = schce.HCEClassifier.load(without_treg)
    state, labels = _state(model), model.hierarchy.labels
    with pytest.raises(ValueError, match=r"CL:0000815 \(regulatory T cell\).*new_labels='add'"):
        model.fine_tune(pbmc, LABELS, new_labels="error")
    with pytest.raises(KeyError, match="labels_key='nope'"):
        model.fine_tune(pbmc, "nope")
    bad = pbmc.copy()
    bad.obs["label"] = bad.obs[LABELS].astype(str)
    bad.obs.loc[bad.obs_names[:3], "label"] = "not a cell type"
    with pytest.raises(schce.LabelMappingError, match="not a cell type"):
        model.fine_tune(bad, "label")
    renamed = pbmc.copy()
    renamed.var_names = [f"gene{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="No gene overlap"):
        model.fine_tune(renamed, LABELS)
    with pytest.raises(ValueError, match="new_labels must be"):
        model.fine_tune(pbmc, LABELS, new_labels="ignore")
    _assert_same_state(model, state)
    assert model.hierarchy.labels == labels and model.setup_state.fine_tuning == []


def test_fine_tune_interrupted_leaves_the_model_unchanged(pbmc, without_treg):
    model = schce.HCEClassifier.load(without_treg)
    state, labels = _state(model), model.hierarchy.labels
    with pytest.raises(TypeError):  # a bad Trainer argument fails inside training, after the head grew
        model.fine_tune(pbmc, LABELS, max_epochs=1, enable_progress_bar=False, no_such_trainer_argument=1)
    _assert_same_state(model, state)
    assert model.hierarchy.labels == labels


def test_fine_tune_a_published_checkpoint(tmp_path, pbmc):
    _write_store(tmp_path, pbmc[pbmc.obs[LABELS] != TREG], "mlp", hce=True)
    model = schce.HCEClassifier.from_sctab_checkpoint(
        tmp_path / "model.ckpt", tmp_path / "var.parquet", tmp_path / "categorical_lookup" / "cell_type.parquet"
    )
    names = model.hierarchy.names()
    head = output_layer(model.module.classifier)
    encoder = {k: v.clone() for k, v in model.module.classifier.encoder.state_dict().items()}
    head_before = head.weight.detach().clone()
    added = model.fine_tune(pbmc, LABELS, max_epochs=5, freeze_encoder=True, seed=0, enable_progress_bar=False)
    assert added == [TREG] and model.hierarchy.names()[:-1] == names
    # Frozen encoder: weights and BatchNorm statistics as published; only the output layer trained.
    for k, v in model.module.classifier.encoder.state_dict().items():
        torch.testing.assert_close(v, encoder[k], rtol=0, atol=0, msg=k)  # frozen: never written
    head = output_layer(model.module.classifier)
    assert head.weight.shape[0] == len(names) + 1 and bool((head.weight[:-1] != head_before).any())
    assert all(p.requires_grad for p in model.module.parameters())  # unfrozen again for later training
    loss = model.history_["train_loss"]["train_loss"].to_numpy()
    assert loss[-1] < loss[0]
    model.fine_tune(pbmc, LABELS, max_epochs=2, seed=0, enable_progress_bar=False)
    assert bool(
        (model.module.classifier.encoder.state_dict()[next(iter(encoder))] != next(iter(encoder.values()))).any()
    )


def test_freeze_encoder_needs_an_encoder(tmp_path, pbmc):
    _write_store(tmp_path, pbmc, "linear", hce=False)
    model = schce.HCEClassifier.from_sctab_checkpoint(
        tmp_path / "model.ckpt", tmp_path / "var.parquet", tmp_path / "categorical_lookup" / "cell_type.parquet"
    )
    with pytest.raises(ValueError, match="no encoder to freeze"):
        model.fine_tune(pbmc, LABELS, freeze_encoder=True)
    model.fine_tune(pbmc, LABELS, max_epochs=2, seed=0, enable_progress_bar=False)
    assert model.module.n_latent == model.hierarchy.n_labels


def test_fine_tune_needs_a_trained_model(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key=LABELS)
    with pytest.raises(RuntimeError, match="call train"):
        schce.HCEClassifier(pbmc_copy, **SMALL_MLP).fine_tune(pbmc_copy, LABELS)
