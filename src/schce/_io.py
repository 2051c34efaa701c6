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
# HCEEnsemble.save: this manifest beside one HCEClassifier directory per member.
ENSEMBLE_FILE = "schce-ensemble.json"


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


def model_files(prefix: str | None = None) -> tuple[str, str, str]:
    """The names of the metadata, weights and AnnData files of a model saved with ``prefix`` (``""``: none)."""
    if prefix is None or prefix == "":
        return MODEL_FILES
    if not isinstance(prefix, str) or prefix.startswith(".") or any(c in prefix for c in "/\\\0"):
        raise ValueError(
            f"prefix must be a file-name prefix (no path separators, not starting with '.'), got "
            f"{prefix!r}; put the folder in dir_path."
        )
    return tuple(prefix + name for name in MODEL_FILES)


def write_files_atomically(
    dir_path: str | os.PathLike, overwrite: bool, write: Callable[[Path], None], names: Collection[str]
) -> None:
    """Write the files ``names`` into the directory ``dir_path`` beside whatever else it holds.

    ``write(tmp)`` fills a temporary directory inside ``dir_path``; each file then replaces its namesake. Existing
    files of these ``names`` need ``overwrite=True`` (those ``write`` did not produce this time are removed then);
    no other entry of ``dir_path`` is touched, so one folder can hold several models saved with different prefixes
    and the user's own files.
    """
    target = Path(dir_path)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(
            f"{target} exists and is not a directory (a file or a link); save into a directory, or choose another path."
        )
    existing = sorted(n for n in names if (target / n).exists() or (target / n).is_symlink())
    if existing and not overwrite:
        raise FileExistsError(
            f"{target} already holds {', '.join(existing)}. Pass overwrite=True to replace them, or choose another "
            "prefix."
        )
    odd = [n for n in existing if (target / n).is_symlink() or not (target / n).is_file()]
    if odd:
        raise FileExistsError(
            f"{', '.join(str(target / n) for n in odd)} is not a plain file; schce will not replace it."
        )
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".schce-save-", dir=target))
    try:
        write(tmp)
        written = [n for n in names if (tmp / n).exists()]
        for name in written:
            os.replace(tmp / name, target / name)
        for name in set(existing) - set(written):  # a previous save's AnnData of the same prefix
            (target / name).unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
    """The metadata of a saved model, with a clear error when ``dir_path`` holds no schce model (of ``prefix``)."""
    path = Path(dir_path)
    meta_name, weights_name, _ = model_files(prefix)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: the path does not exist.")
    if path.is_dir() and (path / ENSEMBLE_FILE).is_file():
        raise ValueError(
            f"{path} holds an HCEEnsemble ({ENSEMBLE_FILE} and one directory per member), not one HCEClassifier: "
            f"load it with schce.HCEEnsemble.load({str(path)!r}), or one member with HCEClassifier.load on its "
            "directory."
        )
    if not path.is_dir() or not (path / meta_name).is_file() or not (path / weights_name).is_file():
        found = sorted(p.name[: -len(META_FILE)] for p in path.glob(f"*{META_FILE}")) if path.is_dir() else []
        hint = f" It holds models of prefix {', '.join(repr(f or None) for f in found)}." if found else ""
        raise ValueError(
            f"{path} is not a schce model directory (expected {meta_name} and {weights_name}, as written by "
            f"HCEClassifier.save).{hint}"
        )
    try:
        meta = loads((path / meta_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / meta_name} is corrupt (not valid JSON: {err}). Save the model again.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / meta_name} is not schce model metadata (format {FORMAT!r} expected).")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer schce (format {meta['format_version']}); upgrade schce to load it."
        )
    return meta
