"""Model files: JSON metadata with numpy support, and atomic directory writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

FORMAT = "schce-model"
FORMAT_VERSION = 1
META_FILE = "schce.json"
WEIGHTS_FILE = "model.pt"
ADATA_FILE = "adata.h5ad"


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


def write_dir_atomically(dir_path: str | os.PathLike, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling directory with ``write(tmp)``, then move it to ``dir_path``.

    A failure leaves ``dir_path`` as it was: no half-written model can appear there.
    """
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists. Pass overwrite=True to replace it, or choose another path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
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
