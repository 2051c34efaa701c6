"""Checks on files handed to schce, run before any work so a bad file fails at once with its name."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path


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


def check_groupby(columns, groupby, default) -> None:
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
            f"groupby column(s) {missing} are not in adata.obs; available: {list(columns)}. Pass existing columns, "
            "or leave groupby out for the default (those of assay, dataset_id, disease, tissue, tissue_general "
            "that exist)."
        )
