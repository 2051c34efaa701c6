"""Model files: JSON metadata with numpy support, and atomic directory writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np

FORMAT = "schce-model"
# 2: checksums of the weights and of the label, gene and hierarchy lists; 3: the model's set-up as its own "setup"
# field instead of a section of scvi-tools' registry
FORMAT_VERSION = 3
META_FILE = "schce.json"
WEIGHTS_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"
# Everything HCEClassifier.save writes; overwrite=True replaces a directory holding only these.
MODEL_FILES = (META_FILE, WEIGHTS_FILE, ADATA_FILE)


def _encode(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"Cannot store {type(obj).__name__} in a schce model file.")


def _decode(d: dict):
    if "__ndarray__" in d:
        dtype = d["dtype"]
        # Object arrays were written as lists of str; keep them object to match what scvi-tools registers.
        return np.array(d["__ndarray__"], dtype=object if dtype == "object" else dtype)
    return d


def dumps(meta: dict) -> str:
    """JSON text of ``meta``; numpy arrays and scalars are kept with their dtype."""
    return json.dumps(meta, default=_encode, indent=1)


def loads(text: str) -> dict:
    """Inverse of :func:`dumps`."""
    return json.loads(text, object_hook=_decode)


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then move it into place (parent created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_save_target(dir_path: str | os.PathLike, overwrite: bool, own: Collection[str] | None = MODEL_FILES) -> None:
    """Refuse a save path whose replacement would lose something schce did not write.

    An existing path needs ``overwrite=True``; even then only a directory holding nothing but names in ``own``
    (default: the files :meth:`~schce.HCEClassifier.save` writes), or nothing at all, may be replaced. ``own=None``
    checks only that the path is a directory (the caller checks its contents once it knows what it writes).
    """
    target = Path(dir_path)
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists. Pass overwrite=True to replace it, or choose another path.")
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(
            f"{target} exists and is not a directory (a file or a link); saving there would replace it with a "
            "directory. Remove it yourself or choose another path."
        )
    if own is None:
        return
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir() if p.name not in own)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise FileExistsError(
            f"{target} holds files that schce did not write ({shown}); overwrite=True only replaces a directory "
            f"schce wrote ({', '.join(sorted(own))}). Choose another path, or move those files away first."
        )


def write_dir_atomically(
    dir_path: str | os.PathLike,
    overwrite: bool,
    write: Callable[[Path], None],
    own: Collection[str] | None = None,
) -> None:
    """Fill a temporary sibling directory with ``write(tmp)``, then move it to ``dir_path``.

    A failure leaves ``dir_path`` as it was: no half-written output can appear there. An existing ``dir_path`` is
    replaced only when every entry in it has a name in ``own`` or among the entries ``write`` produced, so a user's
    own files are never deleted (see :func:`check_save_target`).
    """
    target = Path(dir_path)
    check_save_target(target, overwrite, own)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            # Checked again with what was written: the directory may have changed while we wrote.
            check_save_target(target, overwrite, {*(own or ()), *(p.name for p in tmp.iterdir())})
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "replaced")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_meta(dir_path: str | os.PathLike) -> dict:
    """The metadata of a saved model, with a clear error when ``dir_path`` is not a schce model."""
    path = Path(dir_path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: the path does not exist.")
    if not path.is_dir() or not (path / META_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{path} is not a schce model directory (expected {META_FILE} and {WEIGHTS_FILE}, as written by "
            "HCEClassifier.save)."
        )
    try:
        meta = loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / META_FILE} is corrupt (not valid JSON: {err}). Save the model again.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / META_FILE} is not schce model metadata (format {FORMAT!r} expected).")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer schce (format {meta['format_version']}); upgrade schce to load it."
        )
    return meta
