"""Reading published scTab / HCE-paper Lightning checkpoints: weights, architecture, genes and labels."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
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


# Nested hyperparameter groups that configure training, not the network: their keys (a StepLR ``gamma``, an
# optimizer ``eps``) must never stand in for the network's own settings of the same name (TabNet's ``gamma``).
_NOT_NETWORK = re.compile(r"sched|optim", re.IGNORECASE)


def _flat_hparams(ckpt: dict) -> dict:
    """Hyperparameters as one flat dict: shallower keys win over nested ones, training groups are skipped."""
    out: dict = {}
    level = [dict(ckpt.get("hyper_parameters", {}) or {})]
    while level:
        nested = []
        for d in level:
            for k, v in d.items():
                if isinstance(v, dict):
                    if not _NOT_NETWORK.search(str(k)):
                        nested.append(v)
                else:
                    out.setdefault(str(k), v)
        level = nested
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
    """Output labels, in output order, from ``categorical_lookup/cell_type.parquet`` (an integer index, ``label``).

    When the lookup also has a column of CL IDs (every value ``CL:nnnnnnn``, e.g. ``ontology_term_id``), those are
    returned instead of the names: IDs survive CL's renaming of terms, names do not.
    """
    lookup = pd.read_parquet(cell_type_path)
    if "label" not in lookup.columns:
        raise ValueError(f"{cell_type_path} has no 'label' column (columns: {list(lookup.columns)}).")
    codes = [c for c in lookup.columns if c != "label" and pd.api.types.is_integer_dtype(lookup[c])]
    order = lookup[codes[0]] if codes else pd.Series(lookup.index, index=lookup.index)
    lookup = lookup.assign(_order=order.to_numpy()).sort_values("_order")
    id_columns = [
        c
        for c in lookup.columns
        if c not in ("label", "_order")
        and not pd.api.types.is_numeric_dtype(lookup[c])
        and lookup[c].astype(str).str.fullmatch(r"CL:\d{7}").all()
    ]
    if id_columns:
        logger.info("Reading the labels of %s as CL IDs from its %r column.", cell_type_path, id_columns[0])
        return lookup[id_columns[0]].astype(str).tolist()
    return lookup["label"].astype(str).tolist()


def checkpoint_hierarchy(ckpt: dict, labels: list[str], ontology) -> tuple:
    """The hierarchy a checkpoint was trained with (its ``child_lookup`` buffer) and where today's CL differs.

    Returns ``(hierarchy, differences)``: a :class:`~schce.Hierarchy` whose ``R`` is the checkpoint's
    ``child_lookup`` over ``labels`` (CL IDs in output order), and the table of
    :func:`schce.data.compare_hierarchy` (one row per ancestor/descendant pair of labels on which the checkpoint and
    ``ontology`` disagree; empty when they agree). A checkpoint without ``child_lookup`` gets the ontology's
    hierarchy (with a warning) and ``differences=None``.
    """
    from schce.hierarchy import Hierarchy, compare_hierarchy

    state = ckpt["state_dict"]
    names = {t: ontology.name(t) for t in labels}
    if "child_lookup" not in state:
        logger.warning("The checkpoint has no child_lookup buffer; using the hierarchy of CL %s.", ontology.version)
        return Hierarchy.from_ontology(labels, ontology), None
    child = state["child_lookup"].detach().cpu().numpy()
    transposed = state.get("child_lookup_transposed")
    if transposed is not None and not np.array_equal(transposed.detach().cpu().numpy().T != 0, child != 0):
        logger.warning(
            "The checkpoint's child_lookup_transposed is not the transpose of child_lookup; using the latter."
        )
    hierarchy = Hierarchy.from_child_matrix(labels, child, names=names, version="checkpoint child_lookup")
    differences = compare_hierarchy(child, labels, ontology)
    log_hierarchy_differences(differences, ontology.version, "checkpoint's child_lookup")
    return hierarchy, differences


def log_hierarchy_differences(differences: pd.DataFrame, version: str, source: str) -> None:
    """One log line saying how a published hierarchy and today's Cell Ontology differ (relations between labels)."""
    if not len(differences):
        logger.info("The %s agrees with the Cell Ontology %s.", source, version)
        return
    logger.warning(
        "The %s and the Cell Ontology %s disagree on %d relation(s) between its labels (%d only in the %s, "
        "%d only in the ontology), e.g. %s. The model keeps the published hierarchy for its loss and evaluation; "
        "the full list is in model.hierarchy_differences_.",
        source,
        version,
        len(differences),
        int(differences["in_store"].sum()),
        source,
        int(differences["in_ontology"].sum()),
        "; ".join(
            f"{r.ancestor_name} > {r.descendant_name} ({'published' if r.in_store else 'ontology'} only)"
            for r in differences.head(3).itertuples()
        ),
    )
