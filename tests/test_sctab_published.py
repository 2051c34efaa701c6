"""Published-format checkpoints keep their own hierarchy; checked against a direct computation of the published code.

The checkpoints are written here in the layout of scTab / HCE-paper Lightning checkpoints (``classifier.`` weights,
``class_weights``, ``child_lookup`` and ``child_lookup_transposed`` buffers, nested hyperparameters). The expected
values are computed from the raw state dict with plain tensor algebra written in this file (no schce module): the
published forward pass of the linear model, the MLP and TabNet in eval mode, the published HCE loss
``nll_loss(log(softmax(logits) @ child_lookup.T + 1e-6))`` and the published correct-if-descendant rule
``child_lookup[true, predicted] > 0``.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import schce
from schce import _sctab
from schce.hierarchy import Hierarchy
from schce.nn import make_backbone, normalize_counts
from schce.ontology import load_cell_ontology

SMALL = {"linear": {}, "mlp": {"n_hidden": 16, "n_layers": 3}, "tabnet": {"n_d": 8, "n_a": 6, "n_steps": 3}}
CD8, NAIVE_CD8, CD14_MONO, DC = "CL:0000625", "CL:0000900", "CL:0001054", "CL:0000451"
BN_EPS = 1e-5


# ------------------------------------------------------------------------------------------- published forward
def _bn(x, sd, prefix):
    return (x - sd[f"{prefix}.running_mean"]) / torch.sqrt(sd[f"{prefix}.running_var"] + BN_EPS) * sd[
        f"{prefix}.weight"
    ] + sd[f"{prefix}.bias"]


def _entmax15(z: torch.Tensor) -> torch.Tensor:
    """1.5-entmax by bisection on tau: sum(relu(z/2 - tau)^2) = 1 (float64)."""
    z = z.double() / 2
    hi = z.max(dim=1, keepdim=True).values
    lo = hi - 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        too_big = (torch.clamp(z - mid, min=0) ** 2).sum(1, keepdim=True) < 1
        hi = torch.where(too_big, mid, hi)
        lo = torch.where(too_big, lo, mid)
    return torch.clamp(z - (lo + hi) / 2, min=0) ** 2


def _glu(x, sd, prefix):
    h = _bn(x @ sd[f"{prefix}.fc.weight"].double().T, sd, f"{prefix}.bn.bn")
    n = h.shape[1] // 2
    return h[:, :n] * torch.sigmoid(h[:, n:])


def _feature_transformer(x, sd, prefix, n_shared, n_independent):
    x = _glu(x, sd, f"{prefix}.shared.glu_layers.0")
    for i in range(1, n_shared):
        x = (x + _glu(x, sd, f"{prefix}.shared.glu_layers.{i}")) * math.sqrt(0.5)
    for i in range(n_independent):
        x = (x + _glu(x, sd, f"{prefix}.specifics.glu_layers.{i}")) * math.sqrt(0.5)
    return x


def published_logits(backbone: str, sd: dict, x: torch.Tensor, hp: dict) -> torch.Tensor:
    """Eval-mode logits of scTab's LinearClassifier / MLP / TabNet from their state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
    x = x.double()
    if backbone == "linear":
        return x @ sd["weight"].T + sd["bias"]
    if backbone == "mlp":
        i = 0
        while f"encoder.{i}.weight" in sd:  # Linear, BatchNorm1d, SiLU, Dropout (identity in eval)
            x = F.silu(_bn(x @ sd[f"encoder.{i}.weight"].T + sd[f"encoder.{i}.bias"], sd, f"encoder.{i + 1}"))
            i += 4
        return x @ sd["linear.weight"].T + sd["linear.bias"]
    n_d, steps, gamma = hp["n_d"], hp["n_steps"], hp["gamma"]

    def count(part):
        return sum(
            1 for k in sd if k.startswith(f"encoder.initial_splitter.{part}.glu_layers.") and k.endswith("fc.weight")
        )

    ft = {"n_shared": count("shared"), "n_independent": count("specifics")}
    x = _bn(x, sd, "encoder.initial_bn")
    att = _feature_transformer(x, sd, "encoder.initial_splitter", **ft)[:, n_d:]
    prior, total = torch.ones_like(x), 0.0
    for step in range(steps):
        a = _bn(att @ sd[f"encoder.att_transformers.{step}.fc.weight"].T, sd, f"encoder.att_transformers.{step}.bn.bn")
        mask = _entmax15(a * prior)
        prior = (gamma - mask) * prior
        out = _feature_transformer(mask * x, sd, f"encoder.feat_transformers.{step}", **ft)
        total = total + F.relu(out[:, :n_d])
        att = out[:, n_d:]
    return total @ sd["final_mapping.weight"].T


# ------------------------------------------------------------------------------------------- checkpoint writer
def published_child_lookup(labels: list[str]) -> np.ndarray:
    """A child matrix that differs from today's CL: naive CD8 is not under CD8 T, DC is put under CD14 monocyte."""
    child = Hierarchy.from_ontology(labels).R.astype(np.int64)
    child[labels.index(CD8), labels.index(NAIVE_CD8)] = 0
    child[labels.index(CD14_MONO), labels.index(DC)] = 1
    return child


def write_checkpoint(tmp_path, pbmc, backbone: str, seed: int = 0):
    """Checkpoint (published layout), var.parquet and cell_type.parquet (names in 2023 spelling where renamed)."""
    torch.manual_seed(seed)
    onto = load_cell_ontology()
    names = sorted(pbmc.obs["cell_type"].unique())[::-1]
    labels = [onto.resolve(n) for n in names]
    genes = list(pbmc.var_names)
    net = make_backbone(backbone, len(genes), len(names), **SMALL[backbone])
    for m in net.modules():  # non-trivial running statistics, so eval-mode BatchNorm matters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    child = published_child_lookup(labels)
    state = {f"classifier.{k}": v.clone() for k, v in net.state_dict().items()}
    state["class_weights"] = torch.ones(len(names))
    state["child_lookup"] = torch.tensor(child)
    state["child_lookup_transposed"] = torch.tensor(child.T.astype("f4"))
    hparams = {
        "gene_dim": len(genes),
        "type_dim": len(names),
        "learning_rate": 0.005,
        # Published runs nest their StepLR settings: its gamma must not become TabNet's.
        "lr_scheduler_kwargs": {"step_size": 1, "gamma": 0.9, "interval": "epoch"},
    }
    if backbone == "tabnet":
        hparams.update({"virtual_batch_size": 256, "momentum": 0.02, "gamma": 1.3, "mask_type": "entmax"})
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "model.ckpt")
    pd.DataFrame({"feature_id": genes, "feature_name": genes}).to_parquet(tmp_path / "var.parquet")
    (tmp_path / "categorical_lookup").mkdir()
    pd.DataFrame({"label": names}).to_parquet(tmp_path / "categorical_lookup" / "cell_type.parquet")
    return {k.removeprefix("classifier."): v for k, v in state.items() if k.startswith("classifier.")}, child, labels


def _load(tmp_path):
    return schce.HCEClassifier.from_sctab_checkpoint(
        tmp_path / "model.ckpt", tmp_path / "var.parquet", tmp_path / "categorical_lookup" / "cell_type.parquet"
    )


# ------------------------------------------------------------------------------------------- tests
def test_nested_scheduler_gamma_does_not_become_tabnets_gamma():
    ckpt = {
        "hyper_parameters": {
            "lr_scheduler_kwargs": {"gamma": 0.9, "step_size": 1},
            "optimizer_kwargs": {"eps": 1e-8},
            "model": {"gamma": 1.5, "n_d": 8},
            "gamma": 1.3,
        }
    }
    flat = _sctab._flat_hparams(ckpt)
    assert flat["gamma"] == 1.3 and flat["n_d"] == 8 and "step_size" not in flat and "eps" not in flat
    # TabNet settings nested in a model group are still read, the scheduler's never.
    flat = _sctab._flat_hparams({"hyper_parameters": {"lr_scheduler_kwargs": {"gamma": 0.9}, "model": {"gamma": 1.5}}})
    assert flat["gamma"] == 1.5
    assert "gamma" not in _sctab._flat_hparams({"hyper_parameters": {"lr_scheduler_kwargs": {"gamma": 0.9}}})


@pytest.mark.parametrize("backbone", ["linear", "mlp", "tabnet"])
def test_published_checkpoint_predicts_and_scores_with_its_child_lookup(tmp_path, pbmc, backbone, caplog):
    sd, child, labels = write_checkpoint(tmp_path, pbmc, backbone)
    with caplog.at_level(logging.WARNING, logger="schce._sctab"):
        model = _load(tmp_path)
    if backbone == "tabnet":
        assert model.module.classifier.encoder.gamma == pytest.approx(1.3)  # not the scheduler's 0.9
    # The hierarchy is the checkpoint's, not today's CL.
    np.testing.assert_array_equal(model.hierarchy.R, child != 0)
    assert list(model.hierarchy.labels) == labels
    diff = model.hierarchy_differences_
    assert sorted(zip(diff["ancestor"], diff["descendant"], diff["in_store"], strict=True)) == [
        (CD8, NAIVE_CD8, False),
        (CD14_MONO, DC, True),
    ]
    assert any("disagree on 2 relation(s)" in r.getMessage() for r in caplog.records)

    query = pbmc.copy()
    model.predict(query)
    x = normalize_counts(torch.as_tensor(pbmc.X.toarray(), dtype=torch.float32))
    hp = {**SMALL[backbone], "gamma": 1.3}
    logits = published_logits(backbone, sd, x, hp)
    probs = torch.softmax(logits, dim=1).numpy()
    got = query.obsm["schce_probabilities"].to_numpy()
    if backbone == "tabnet":
        # In float64 the network equals the published computation; in float32 (as scTab runs it too) three steps of
        # sparse attention over 765 genes amplify rounding near entmax's support boundary.
        with torch.no_grad():
            out = copy.deepcopy(model.module.classifier).double().eval()(x.double())
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, logits, rtol=0, atol=1e-8)
        np.testing.assert_allclose(got, probs, atol=2e-2, rtol=0)
        assert (got.argmax(1) == probs.argmax(1)).mean() >= 0.98
    else:
        np.testing.assert_allclose(got, probs, atol=2e-5, rtol=0)

    # Scoring: the published rule on the checkpoint's own child_lookup.
    result = model.evaluate(pbmc.copy(), labels_key="cell_type", groupby=())
    mapping = load_cell_ontology().map_labels(pbmc.obs["cell_type"])
    true = pd.Index(labels).get_indexer(pbmc.obs["cell_type"].astype(str).map(mapping))
    assert (true >= 0).all()
    pred = got.argmax(1)  # the model's calls, scored by the published rule
    published_correct = child[true, pred] > 0
    assert result["corrected_accuracy"] == pytest.approx(published_correct.mean(), abs=1e-12)
    assert result["accuracy"] == pytest.approx((pred == true).mean(), abs=1e-12)

    # Loss: the published HCE on child_lookup_transposed equals the model's loss on its reachability.
    from schce.losses import hierarchical_cross_entropy

    y = torch.as_tensor(true)
    published = F.nll_loss(torch.log(torch.softmax(logits, 1) @ torch.tensor(child.T, dtype=torch.float64) + 1e-6), y)
    R = torch.as_tensor(model.hierarchy.R, dtype=torch.float64)
    torch.testing.assert_close(
        hierarchical_cross_entropy(logits, y, R, form="reference"), published, rtol=1e-10, atol=0
    )
    # schce's exact log form agrees wherever the subtree probability is well above the published 1e-6 offset.
    q = (torch.softmax(logits, 1) @ R.T).gather(1, y[:, None])[:, 0]
    ok = q > 1e-3
    per_cell = hierarchical_cross_entropy(logits, y, R, reduction="none")
    torch.testing.assert_close(per_cell[ok], -torch.log(q[ok] + 1e-6), rtol=1e-3, atol=1e-5)


def test_hierarchy_survives_save_and_load(tmp_path, pbmc):
    _, child, _ = write_checkpoint(tmp_path, pbmc, "linear")
    model = _load(tmp_path)
    model.save(tmp_path / "saved")
    loaded = schce.HCEClassifier.load(tmp_path / "saved")
    np.testing.assert_array_equal(loaded.hierarchy.R, child != 0)


def test_checkpoint_lookup_with_cl_ids_is_read_through_them(tmp_path, pbmc):
    write_checkpoint(tmp_path, pbmc, "linear")
    lookup = tmp_path / "categorical_lookup" / "cell_type.parquet"
    df = pd.read_parquet(lookup)
    ids = [load_cell_ontology().resolve(n) for n in df["label"]]
    # A lookup that carries CL IDs is read through them, even where a name would not resolve.
    df.assign(label=["no longer a CL name"] * len(df), ontology_term_id=ids).to_parquet(lookup)
    model = _load(tmp_path)
    assert list(model.hierarchy.labels) == ids


def test_from_child_matrix_checks_the_matrix():
    labels = ["CL:0000000", "CL:0000084", "CL:0000236"]
    h = Hierarchy.from_child_matrix(labels, np.array([[1, 1, 1], [0, 1, 0], [0, 0, 1]]))
    assert h.edges() == [("CL:0000000", "CL:0000084"), ("CL:0000000", "CL:0000236")]
    with pytest.raises(ValueError, match="shape"):
        Hierarchy.from_child_matrix(labels, np.eye(2))
    with pytest.raises(ValueError, match="not reflexive"):
        Hierarchy.from_child_matrix(labels, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="not transitive"):
        Hierarchy.from_child_matrix(labels, np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]]))
    with pytest.raises(schce.HierarchyCycleError):
        Hierarchy.from_child_matrix(labels, np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]]))


def _sctab_164_names() -> list[str]:
    lines = (Path(__file__).parent / "data" / "sctab_cell_types.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_checkpoint_and_store_with_the_164_published_labels_load(tmp_path):
    from _private import store_setup

    names = _sctab_164_names()
    onto = load_cell_ontology()
    labels = [onto.resolve(n) for n in names]
    child = Hierarchy.from_ontology(labels, onto).R.astype(np.int64)
    genes = [f"ENSG{i:011d}" for i in range(12)]
    torch.manual_seed(0)
    net = torch.nn.Linear(len(genes), len(names))
    state = {"classifier.weight": net.weight.detach(), "classifier.bias": net.bias.detach()}
    state.update(child_lookup=torch.tensor(child), child_lookup_transposed=torch.tensor(child.T.astype("f4")))
    torch.save({"state_dict": state, "hyper_parameters": {}}, tmp_path / "model.ckpt")
    for split in ("train", "val", "test"):
        (tmp_path / split).mkdir()
    (tmp_path / "categorical_lookup").mkdir()
    (tmp_path / "cell_type_hierarchy").mkdir()
    pd.DataFrame({"feature_id": genes, "feature_name": genes}).to_parquet(tmp_path / "var.parquet")
    pd.DataFrame({"label": names}).to_parquet(tmp_path / "categorical_lookup" / "cell_type.parquet")
    np.save(tmp_path / "cell_type_hierarchy" / "child_matrix.npy", child.astype("f8"))

    model = _load(tmp_path)
    assert list(model.hierarchy.labels) == labels and len(set(labels)) == 164
    assert len(model.hierarchy_differences_) == 0  # built from today's CL, so it agrees
    setup = store_setup(tmp_path, normalize=False)
    assert setup["labels"] == labels
    np.testing.assert_array_equal(setup["hierarchy"].R, child != 0)


def test_checkpoint_scored_in_the_papers_convention(tmp_path, pbmc):
    from sklearn.metrics import f1_score

    sd, child, labels = write_checkpoint(tmp_path, pbmc, "mlp")
    model = _load(tmp_path)
    query = pbmc.copy()
    query.obs["truth"] = query.obs["cell_type"].astype(str)
    query.obs.loc[query.obs_names[:20], "truth"] = "T cell"  # not a model label: the paper drops these cells
    x = normalize_counts(torch.as_tensor(pbmc.X.toarray(), dtype=torch.float32))
    pred = published_logits("mlp", sd, x, {}).argmax(1).numpy()
    mapping = load_cell_ontology().map_labels(query.obs["truth"])
    true = pd.Index(labels).get_indexer(query.obs["truth"].map(mapping))
    keep = true >= 0
    t, p = true[keep], pred[keep]
    corrected = np.where(child[t, p] > 0, t, p)  # the published correct_labels
    for convention, label_set in (("paper", np.union1d(t, corrected)), ("paper_ood", np.unique(t))):
        result = model.evaluate(query, labels_key="truth", convention=convention)
        assert result["n_dropped"] == 20 and result["n_scored"] == pbmc.n_obs - 20
        expected = f1_score(t, corrected, labels=label_set, average="macro", zero_division=0)
        assert result["macro_f1"] == pytest.approx(expected, abs=1e-12)
    ours = model.evaluate(query, labels_key="truth", groupby=())
    assert ours["n_cells"] == pbmc.n_obs  # schce's own evaluation keeps every cell
