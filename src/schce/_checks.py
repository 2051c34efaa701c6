"""Checks on files handed to schce, run before any work so a bad file fails at once with its name."""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def check_checkpoint_file(path: str | os.PathLike | None, what: str = "ckpt_path") -> None:
    """Refuse an empty, truncated or damaged Lightning checkpoint before training starts from it.

    ``torch.save`` writes a zip archive; a file cut short (a run killed while saving, a copy that stopped) has no
    zip directory, and a damaged one fails the archive's CRC check.
    """
    if path is None:
        return
    path = Path(path)
    fix = "Resume from another checkpoint (e.g. best.ckpt), or train without ckpt_path to start afresh."
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{what}={str(path)!r} is empty (0 bytes): the checkpoint was never completely written. {fix}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{what}={str(path)!r} ({size} bytes) is truncated or is not a PyTorch checkpoint (no zip directory). {fix}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{what}={str(path)!r} is damaged and cannot be read ({err}). {fix}") from err
    if bad is not None:
        raise ValueError(f"{what}={str(path)!r} is damaged (entry {bad!r} fails its checksum). {fix}")


def check_groupby(columns, groupby, default, where: str = "adata.obs") -> None:
    """Refuse ``groupby`` columns the user named that ``obs`` lacks (the defaults are optional and skipped).

    Raises
    ------
    KeyError
        Naming the missing columns and those available.
    """
    if groupby is default:
        return
    if isinstance(groupby, str):
        groupby = [groupby]
    missing = [c for c in groupby if c not in columns]
    if missing:
        raise KeyError(
            f"groupby column(s) {missing} are not in {where}; available: {list(columns)}. Pass existing columns, "
            "or leave groupby out for the default (those of assay, dataset_id, disease, tissue, tissue_general "
            "that exist)."
        )


# Columns scvi-tools adds to obs when registering.
SCVI_COLUMNS = ("_scvi_labels", "_scvi_batch")


def check_setup_obs(adata, batch_key: str | None, places: dict | None = None) -> None:
    """Checks on ``obs`` before scvi-tools registers it, so a failure leaves ``obs`` as it was.

    Parameters
    ----------
    adata
        The AnnData, or the MuData, being set up.
    batch_key
        The batch column, or ``None``.
    places
        For a MuData: ``{"labels_key": (obs, name), "batch_key": (obs, name)}``, the ``obs`` frame each field is read
        from (where scvi-tools writes its ``_scvi_labels`` / ``_scvi_batch`` column) and how to name it in messages
        (``"mdata.obs"``, ``"mdata['rna'].obs"``). Default: ``adata.obs`` for both.

    Raises
    ------
    ValueError
        When ``batch_key`` has missing values (naming how many and some of the cells), or when an ``obs`` holds a
        column named like scvi-tools' registry columns that an earlier set-up did not write.
    """
    places = places or {"labels_key": (adata.obs, "adata.obs"), "batch_key": (adata.obs, "adata.obs")}
    if batch_key is not None:
        obs, where = places["batch_key"]
        missing = obs[batch_key].isna().to_numpy()
        if missing.any():
            cells = ", ".join(map(str, obs.index[missing][:5])) + (" ..." if missing.sum() > 5 else "")
            raise ValueError(
                f"batch_key={batch_key!r}: {where}[{batch_key!r}] has {int(missing.sum())} missing value(s) (NaN), "
                f"in cells {cells}. Fill them (e.g. with 'unknown') or drop those cells before set-up."
            )
    if "_scvi_manager_uuid" in adata.uns:  # scvi-tools wrote those columns itself
        return
    clashes: dict[str, list[str]] = {}
    for (obs, where), column in zip((places["labels_key"], places["batch_key"]), SCVI_COLUMNS, strict=True):
        if column in obs.columns:
            clashes.setdefault(where, []).append(column)
    if clashes:
        found = "; ".join(f"{where} has column(s) {columns}" for where, columns in clashes.items())
        where, columns = next(iter(clashes.items()))
        raise ValueError(
            f"{found}, which scvi-tools' set-up would overwrite with its own codes. Rename them first, e.g. "
            f"{where}.rename(columns={{{columns[0]!r}: 'my{columns[0]}'}}, inplace=True)."
        )


@contextmanager
def obs_restored_on_error(adata):
    """Drop the ``obs`` columns added inside the block when it raises, so a failed set-up leaves ``obs`` as it was."""
    before = list(adata.obs.columns)
    try:
        yield
    except BaseException:
        added = [c for c in adata.obs.columns if c not in before]
        if added:
            adata.obs.drop(columns=added, inplace=True)
        raise


def check_registration_current(model) -> None:
    """Refuse to train a model on a registration that changed after the model was built.

    A second ``setup_anndata`` on the same AnnData rewrites the registry columns with new codes, and labels edited
    after set-up are not in the registered codes; training on either would pair labels with the wrong outputs.
    """
    adata = model.adata
    manager = model.adata_manager
    if adata is None or manager is None:
        return
    fix = "Build a new model after the last setup_anndata: HCEClassifier(adata, ...)."
    if adata.uns.get("_scvi_manager_uuid", manager.id) != manager.id:
        raise RuntimeError(
            "setup_anndata was called again on this AnnData after the model was built, so its registered labels "
            f"no longer match the model's outputs. {fix}"
        )
    labels_key = model.registry_["setup_args"].get("labels_key")
    obs = getattr(adata, "obs", None)
    if (
        labels_key is None
        or obs is None
        or labels_key not in obs.columns
        or "rna_layer" in model.registry_["setup_args"]
    ):
        return
    from scvi import REGISTRY_KEYS

    mapping = np.asarray(manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping, dtype=str)
    codes = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel().astype(np.int64)
    current = obs[labels_key].astype(str).to_numpy()
    changed = np.flatnonzero(mapping[codes] != current)
    if changed.size:
        raise RuntimeError(
            f"obs[{labels_key!r}] changed for {changed.size} cell(s) (e.g. {obs.index[changed[0]]!r}) after "
            f"setup_anndata, so the registered labels are stale. Call setup_anndata again, then {fix[0].lower()}"
            f"{fix[1:]}"
        )
