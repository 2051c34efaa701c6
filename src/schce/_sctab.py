"""Reading published scTab / HCE-paper Lightning checkpoints: weights, architecture, genes and labels."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import pandas as pd
import torch

logger = logging.getLogger(__name__)

# Buffers of scTab's training module that are not classifier weights.
_NOT_WEIGHTS = ("class_weights", "child_lookup", "child_lookup_transposed", "augmentations")
# TabNet settings that shapes cannot tell, with the published values.
_TABNET_DEFAULTS = {
    "gamma": 1.3,
    "virtual_batch_size": 256,
    "momentum": 0.02,
    "mask_type": "entmax",
    "lambda_sparse": 1e-5,
    # Not among scTab's hyperparameters (PyTorch's default there); pinned so a published TabNet stays scTab's.
    "initial_bn_eps": 1e-5,
}


def _allowed_hyperparameter_types() -> list:
    """What published scTab checkpoints pickle beside tensors and builtins.

    scTab's Lightning module saves its constructor arguments: the optimizer and scheduler *classes*
    (``torch.optim.AdamW``, ``torch.optim.lr_scheduler.StepLR``) and sizes that may be numpy integers.
    """
    import numpy as np

    scalar = getattr(np, "_core", np.core).multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in ("int32", "int64", "float32", "float64", "bool")]
    optim, sched = torch.optim, torch.optim.lr_scheduler
    classes = [optim.AdamW, optim.Adam, optim.SGD, sched.StepLR, sched.MultiStepLR, sched.ExponentialLR]
    return [*classes, scalar, np.dtype, *dtypes]


def load_checkpoint(path: str | os.PathLike, trusted: bool = False) -> dict:
    """The checkpoint dict, tensors on the CPU; a clear error for anything else.

    Only tensors, builtins and the hyperparameter types of :func:`_allowed_hyperparameter_types` are unpickled,
    so a downloaded file cannot run code. ``trusted=True`` unpickles anything (for a file you made or trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): the checkpoint was not completely written or downloaded.")
    if trusted:
        logger.info("Loading %s with full unpickling (trusted=True).", path)
    else:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise ValueError(
                f"{path} holds Python objects other than tensors and scTab's hyperparameter types ({', '.join(unsafe)})"
                "; unpickling them could run arbitrary code, so schce refuses. If you trust this file (you wrote it, "
                "or trust who did), pass trusted=True."
            )
    try:
        if trusted:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with torch.serialization.safe_globals(_allowed_hyperparameter_types()):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        hint = "" if trusted else " If it is an older (non-zip) checkpoint that you trust, pass trusted=True."
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {str(err).splitlines()[0]}{hint}") from err
    except Exception as err:  # torch raises several types for damaged files
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged?): {err}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict').")
    return ckpt


def _unsafe_globals(path: Path) -> list[str]:
    """Globals a (zip) checkpoint would unpickle beyond the allowed ones; empty when it cannot tell."""
    try:
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in _allowed_hyperparameter_types()}
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # a legacy or damaged file: the safe loader below still refuses what it cannot vet
        return []


def _flat_hparams(ckpt: dict) -> dict:
    out: dict = {}

    def walk(d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            else:
                out.setdefault(str(k), v)

    walk(dict(ckpt.get("hyper_parameters", {}) or {}))
    return out


def classifier_from_checkpoint(ckpt: dict) -> tuple[str, dict, dict[str, torch.Tensor], str]:
    """Backbone name, its hyperparameters, its state dict (without the ``classifier.`` prefix) and the loss.

    The architecture is read from the weights' shapes, so it does not depend on how the training code named its
    hyperparameters; settings shapes cannot tell (TabNet's virtual batch size, momentum, gamma, mask type) come from
    the checkpoint's hyperparameters when present, else the published values.
    """
    state = {k.removeprefix("classifier."): v for k, v in ckpt["state_dict"].items() if k.startswith("classifier.")}
    extra = sorted(k for k in ckpt["state_dict"] if not k.startswith("classifier.") and k not in _NOT_WEIGHTS)
    if extra:
        logger.warning("Ignoring checkpoint entries that are neither classifier weights nor known buffers: %s", extra)
    if not state:
        raise ValueError("The checkpoint has no 'classifier.' weights; is it a scTab / HCE-paper checkpoint?")
    loss = "hce" if "child_lookup_transposed" in ckpt["state_dict"] else "ce"
    hp = _flat_hparams(ckpt)

    def count(pattern: str) -> int:
        return len({m.group(1) for k in state if (m := re.match(pattern, k))})

    if set(state) == {"weight", "bias"}:
        return "linear", {}, state, loss
    if "linear.weight" in state and "encoder.0.weight" in state:
        n_layers = sum(1 for k, v in state.items() if re.fullmatch(r"encoder\.\d+\.weight", k) and v.ndim == 2)
        arch = {"n_hidden": int(state["encoder.0.weight"].shape[0]), "n_layers": n_layers}
        if isinstance(hp.get("dropout"), float):
            arch["dropout"] = hp["dropout"]
        return "mlp", arch, state, loss
    if "final_mapping.weight" in state and "encoder.initial_bn.weight" in state:
        glu_out = int(state["encoder.initial_splitter.shared.glu_layers.0.fc.weight"].shape[0])
        n_a = int(state["encoder.att_transformers.0.fc.weight"].shape[1])
        arch = {
            "n_d": glu_out // 2 - n_a,
            "n_a": n_a,
            "n_steps": count(r"encoder\.att_transformers\.(\d+)\."),
            "n_shared": count(r"encoder\.initial_splitter\.shared\.glu_layers\.(\d+)\."),
            "n_independent": count(r"encoder\.initial_splitter\.specifics\.glu_layers\.(\d+)\."),
        }
        arch.update({k: hp.get(k, v) for k, v in _TABNET_DEFAULTS.items()})
        return "tabnet", arch, state, loss
    raise ValueError(f"Unrecognised classifier weights in the checkpoint (first keys: {sorted(state)[:5]}).")


def read_genes(var_path: str | os.PathLike) -> list[str]:
    """Model genes, in input order, from scTab's ``var.parquet`` (``feature_id``, else ``feature_name``)."""
    var = pd.read_parquet(var_path)
    for column in ("feature_id", "feature_name"):
        if column in var.columns:
            return var[column].astype(str).tolist()
    raise ValueError(
        f"{var_path} has neither a 'feature_id' nor a 'feature_name' column (columns: {list(var.columns)})."
    )


def read_labels(cell_type_path: str | os.PathLike) -> list[str]:
    """Output labels, in output order, from ``categorical_lookup/cell_type.parquet`` (an integer index, ``label``)."""
    lookup = pd.read_parquet(cell_type_path)
    if "label" not in lookup.columns:
        raise ValueError(f"{cell_type_path} has no 'label' column (columns: {list(lookup.columns)}).")
    codes = [c for c in lookup.columns if c != "label" and pd.api.types.is_integer_dtype(lookup[c])]
    order = lookup[codes[0]] if codes else pd.Series(lookup.index, index=lookup.index)
    return lookup.assign(_order=order.to_numpy()).sort_values("_order")["label"].astype(str).tolist()
