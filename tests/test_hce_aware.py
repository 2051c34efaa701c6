"""Annotation-aware HCE: the loss equals CE or HCE under the forced readings, and the model trains and round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MLP

import schce
from schce.hierarchy import Hierarchy
from schce.losses import hierarchical_cross_entropy
from schce.nn import HCEModule, make_backbone
from schce.train import HCETrainingPlan

EDGES = [("A", "B"), ("A", "C"), ("B", "D"), ("B", "E"), ("C", "E")]


def _plan_loss(h: Hierarchy, codes: np.ndarray, sources, semantics: str, logits: torch.Tensor, weight):
    masks, rows = h.annotation_targets(codes, sources, semantics)
    module = HCEModule(make_backbone("linear", 3, h.n_labels))
    plan = HCETrainingPlan(module, h.R, loss="hce-aware", target_masks=masks)
    batch = {"y": torch.as_tensor(codes), "target": torch.as_tensor(rows)}
    return plan._loss(logits, batch, weight)


@pytest.mark.parametrize("weighted", [False, True])
def test_forced_readings_equal_ce_and_hce(weighted):
    h = Hierarchy.from_edges(EDGES)
    gen = torch.Generator().manual_seed(0)
    codes = np.array([0, 1, 2, 3, 4, 1, 0])
    logits = torch.randn(len(codes), 5, generator=gen, dtype=torch.float64)
    weight = torch.tensor([0.5, 2.0, 1.0, 3.0, 0.7], dtype=torch.float64) if weighted else None
    y = torch.as_tensor(codes)
    exclusive = _plan_loss(h, codes, None, "exclusive", logits, weight)
    torch.testing.assert_close(exclusive, F.cross_entropy(logits, y, weight=weight))
    inclusive = _plan_loss(h, codes, None, "inclusive", logits, weight)
    torch.testing.assert_close(inclusive, hierarchical_cross_entropy(logits, y, h.reachability(torch.float64), weight))


def test_auto_reading_is_minus_log_of_the_acceptable_mass():
    h = Hierarchy.from_edges(EDGES)
    codes = np.array([0, 1, 3])  # one source using A, B, D: A means {A, C}, B means {B, E}, D means {D}
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]] * 3, dtype=torch.float64)
    p = torch.softmax(logits[0], 0)
    expected = -(torch.log(p[0] + p[2]) + torch.log(p[1] + p[4]) + torch.log(p[3])) / 3
    torch.testing.assert_close(_plan_loss(h, codes, None, "auto", logits, None), expected)


def test_hce_aware_trains_predicts_and_round_trips(pbmc_copy, tmp_path):
    adata = pbmc_copy
    # Two annotation sources: one coarsens CD14/CD16 monocytes to "monocyte", the other keeps them.
    adata.obs["source"] = np.where(np.arange(adata.n_obs) % 2 == 0, "fine", "coarse")
    labels = adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy().copy()
    coarse = (adata.obs["source"] == "coarse").to_numpy() & np.isin(labels, ["CL:0001054", "CL:0002396"])
    labels[coarse] = "CL:0000576"
    adata.obs["annotation"] = labels
    schce.HCEClassifier.setup_anndata(adata, labels_key="annotation", batch_key="source")
    model = schce.HCEClassifier(adata, loss="hce-aware", **SMALL_MLP)
    assert "hce-aware (auto)" in repr(model)
    model.train(max_epochs=3, seed=0, enable_progress_bar=False)
    out = model.predict(adata, inplace=False)
    assert out["schce_prediction_ontology_term_id"].isin(model.hierarchy.labels).all()
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m")
    assert loaded.loss == "hce-aware" and loaded.label_semantics == "auto"
    np.testing.assert_array_equal(
        loaded.predict(adata, inplace=False)["schce_prediction_ontology_term_id"],
        out["schce_prediction_ontology_term_id"],
    )


def test_bad_loss_and_semantics_are_named(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key="cell_type_ontology_term_id")
    with pytest.raises(ValueError, match="loss must be one of"):
        schce.HCEClassifier(pbmc_copy, loss="hierarchical")
    with pytest.raises(ValueError, match="label_semantics must be one of"):
        schce.HCEClassifier(pbmc_copy, loss="hce-aware", label_semantics="coarse")
