"""Published scTab / HCE-paper checkpoints: written here in exactly their layout from our own modules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import schce
from schce.nn import make_backbone, normalize_counts

SMALL = {"linear": {}, "mlp": {"n_hidden": 16, "n_layers": 3}, "tabnet": {"n_d": 8, "n_a": 8, "n_steps": 2}}


def _write_store(tmp_path, pbmc, backbone: str, hce: bool, seed: int = 0):
    """A checkpoint with `classifier.` weights and scTab's buffers, var.parquet and cell_type.parquet."""
    torch.manual_seed(seed)
    names = sorted(pbmc.obs["cell_type"].unique())[::-1]  # an output order that is not sorted by CL ID
    genes = list(pbmc.var_names)
    net = make_backbone(backbone, len(genes), len(names), **SMALL[backbone])
    for m in net.modules():  # non-trivial running statistics, so eval-mode BatchNorm matters
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net.eval()
    k = len(names)
    state = {f"classifier.{key}": value for key, value in net.state_dict().items()}
    state["class_weights"] = torch.ones(k)
    state["child_lookup"] = torch.eye(k)
    if hce:
        state["child_lookup_transposed"] = torch.eye(k)
    hparams = {"gene_dim": len(genes), "type_dim": k, "learning_rate": 1e-3}
    if backbone == "tabnet":
        hparams.update({"virtual_batch_size": 256, "momentum": 0.02, "gamma": 1.3, "mask_type": "entmax"})
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3}, tmp_path / "model.ckpt")
    pd.DataFrame({"feature_id": genes, "feature_name": genes}).to_parquet(tmp_path / "var.parquet")
    (tmp_path / "categorical_lookup").mkdir()
    pd.DataFrame({"label": names}).to_parquet(tmp_path / "categorical_lookup" / "cell_type.parquet")
    return net, names


@pytest.mark.parametrize("backbone", ["linear", "mlp", "tabnet"])
def test_checkpoint_predicts_like_the_network_it_holds(tmp_path, pbmc, backbone):
    net, names = _write_store(tmp_path, pbmc, backbone, hce=backbone != "linear")
    model = schce.HCEClassifier.from_sctab_checkpoint(
        tmp_path / "model.ckpt", tmp_path / "var.parquet", tmp_path / "categorical_lookup" / "cell_type.parquet"
    )
    assert model.backbone == backbone and model.loss == ("ce" if backbone == "linear" else "hce")
    assert model.hierarchy.names() == names  # the checkpoint's output order is kept
    assert not model.standardize and not hasattr(model.module, "input_mean")  # scTab reads log-normalised values
    if backbone == "tabnet":  # scTab's input batch norm, whatever the package defaults for new TabNets are
        assert model.module.classifier.encoder.initial_bn.eps == 1e-5
    query = pbmc.copy()
    model.predict(query)
    with torch.no_grad():
        x = torch.as_tensor(pbmc.X.toarray(), dtype=torch.float32)
        expected = torch.softmax(net(normalize_counts(x)).double(), dim=1).numpy()
    np.testing.assert_allclose(query.obsm["schce_probabilities"].to_numpy(), expected, atol=1e-5)
    assert (query.obs["schce_prediction"].astype(str).to_numpy() == np.asarray(names)[expected.argmax(1)]).all()


def test_checkpoint_survives_save_load_and_a_reordered_query(tmp_path, pbmc):
    _write_store(tmp_path, pbmc, "mlp", hce=True)
    model = schce.HCEClassifier.from_sctab_checkpoint(
        tmp_path / "model.ckpt", tmp_path / "var.parquet", tmp_path / "categorical_lookup" / "cell_type.parquet"
    )
    ref = model.predict(pbmc.copy(), inplace=False)
    model.save(tmp_path / "saved")
    loaded = schce.HCEClassifier.load(tmp_path / "saved")
    shuffled = pbmc[:, np.random.default_rng(0).permutation(pbmc.n_vars)].copy()
    df = loaded.predict(shuffled, inplace=False)
    np.testing.assert_allclose(df["schce_confidence"], ref["schce_confidence"], atol=1e-6)


def test_bad_checkpoint_files(tmp_path, pbmc):
    _write_store(tmp_path, pbmc, "linear", hce=False)
    var, lookup = tmp_path / "var.parquet", tmp_path / "categorical_lookup" / "cell_type.parquet"
    with pytest.raises(FileNotFoundError):
        schce.HCEClassifier.from_sctab_checkpoint(tmp_path / "missing.ckpt", var, lookup)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        schce.HCEClassifier.from_sctab_checkpoint(tmp_path / "junk.ckpt", var, lookup)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        schce.HCEClassifier.from_sctab_checkpoint(tmp_path / "other.ckpt", var, lookup)
    pd.DataFrame({"label": ["T cell", "not a cell type"]}).to_parquet(tmp_path / "bad_labels.parquet")
    with pytest.raises(schce.LabelMappingError, match="not a cell type"):
        schce.HCEClassifier.from_sctab_checkpoint(tmp_path / "model.ckpt", var, tmp_path / "bad_labels.parquet")
