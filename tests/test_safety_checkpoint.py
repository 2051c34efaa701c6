"""Issue 24: published checkpoints load without unpickling arbitrary objects; anything else needs trusted=True."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import schce
from schce import _sctab


def _record(path: str):
    """Runs only if the checkpoint is unpickled in full: leaves a file behind as proof."""
    with open(path, "w") as f:
        f.write("code ran")
    return {"ran": True}


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return _record, (self.path,)


def _files(tmp_path, pbmc, hparams: dict):
    names = sorted(pbmc.obs["cell_type"].unique())
    genes = list(pbmc.var_names)
    torch.manual_seed(0)
    linear = torch.nn.Linear(len(genes), len(names))
    state = {"classifier.weight": linear.weight.detach(), "classifier.bias": linear.bias.detach()}
    state["class_weights"] = torch.ones(len(names))
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 1}, tmp_path / "model.ckpt")
    pd.DataFrame({"feature_id": genes}).to_parquet(tmp_path / "var.parquet")
    pd.DataFrame({"label": names}).to_parquet(tmp_path / "cell_type.parquet")
    return tmp_path / "model.ckpt", tmp_path / "var.parquet", tmp_path / "cell_type.parquet"


def test_sctab_hyperparameter_types_load_with_the_safe_loader(tmp_path, pbmc):
    # What scTab's save_hyperparameters() stores: optimizer and scheduler classes, numpy sizes, plain dicts.
    hparams = {
        "gene_dim": np.int64(pbmc.n_vars),
        "learning_rate": np.float64(5e-4),
        "optimizer": torch.optim.AdamW,
        "lr_scheduler": torch.optim.lr_scheduler.StepLR,
        "lr_scheduler_kwargs": {"step_size": 1, "gamma": 0.9, "verbose": True},
    }
    ckpt, var, lookup = _files(tmp_path, pbmc, hparams)
    loaded = _sctab.load_checkpoint(ckpt)
    assert loaded["hyper_parameters"]["optimizer"] is torch.optim.AdamW
    assert int(loaded["hyper_parameters"]["gene_dim"]) == pbmc.n_vars
    model = schce.HCEClassifier.from_sctab_checkpoint(ckpt, var, lookup)
    assert model.backbone == "linear" and model.is_trained_


def test_other_pickled_objects_are_refused_unless_trusted(tmp_path, pbmc):
    marker = tmp_path / "marker.txt"
    ckpt, var, lookup = _files(tmp_path, pbmc, {"extra": _Payload(str(marker))})
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors .*_record.*pass trusted=True"):
        schce.HCEClassifier.from_sctab_checkpoint(ckpt, var, lookup)
    assert not marker.exists()  # nothing in the file ran
    model = schce.HCEClassifier.from_sctab_checkpoint(ckpt, var, lookup, trusted=True)
    assert marker.read_text() == "code ran" and model.is_trained_


def test_empty_and_truncated_checkpoints_are_named(tmp_path, pbmc):
    ckpt, var, lookup = _files(tmp_path, pbmc, {})
    data = ckpt.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.ckpt is empty \(0 bytes\)"):
        schce.HCEClassifier.from_sctab_checkpoint(tmp_path / "empty.ckpt", var, lookup)
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.ckpt is not a readable PyTorch checkpoint"):
        schce.HCEClassifier.from_sctab_checkpoint(tmp_path / "cut.ckpt", var, lookup)
