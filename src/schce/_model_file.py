"""Saved models: checksums of the weights and of the label and gene lists, and a check of every metadata field.

A model directory holds ``model.pt`` (weights) and ``schce.json`` (metadata, see :mod:`schce._io`). Since format 2
the metadata carries the sha256 of ``model.pt`` and of the label, gene and hierarchy lists, so a damaged, swapped or
edited file is refused on load, naming what differs, instead of predicting garbage. Since format 3 the model's own
set-up (:class:`~schce.model.SetupState`) is the field ``setup``; earlier files kept it inside the registry, and
:func:`setup_and_registry` reads both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from numbers import Integral, Real
from pathlib import Path

import torch
from anndata import AnnData

from schce import _io
from schce._constants import SETUP_KEY

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(value) -> str:
    """Hex sha256 of a JSON-able value (keys sorted), so the same list in another order differs."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def setup_and_registry(meta: dict) -> tuple[dict, dict]:
    """The model's own set-up and scvi-tools' registry (format 2 and earlier kept the set-up inside the registry)."""
    registry = {k: v for k, v in meta["registry"].items() if k != SETUP_KEY}
    return (meta["setup"] if "setup" in meta else meta["registry"][SETUP_KEY]), registry


def _content_checksums(meta: dict) -> dict[str, str]:
    setup = setup_and_registry(meta)[0]
    hierarchy = setup["hierarchy"]
    return {
        "labels": json_sha256([str(x) for x in hierarchy["labels"]]),
        "genes": json_sha256([str(g) for g in setup["genes"]]),
        "hierarchy": json_sha256([[str(a), str(b)] for a, b in hierarchy["edges"]]),
    }


def write_model(
    dir_path: str | os.PathLike,
    overwrite: bool,
    meta: dict,
    state: dict,
    adata: AnnData | None = None,
    prefix: str | None = None,
) -> None:
    """Write ``model.pt`` and ``schce.json`` (with checksums), and ``adata.h5ad`` when given, atomically.

    Without ``prefix`` the directory is the model: only a new path, or with ``overwrite=True`` a directory holding
    nothing but schce's model files, is written. With a ``prefix`` the files (``<prefix>model.pt``, ...) go into
    ``dir_path`` beside anything else there, and only files of that prefix are ever replaced (``overwrite=True``).
    Either is checked before anything is written.
    """
    meta_name, weights_name, adata_name = names = _io.model_files(prefix)
    if not prefix:
        _io.check_save_target(dir_path, overwrite)
    meta = {**meta, "format": _io.FORMAT, "format_version": _io.FORMAT_VERSION}
    validate_meta(meta, Path(dir_path) / meta_name, check_sums=False)

    def write(tmp: Path) -> None:
        torch.save(state, tmp / weights_name)
        checksums = {"weights": file_sha256(tmp / weights_name), **_content_checksums(meta)}
        (tmp / meta_name).write_text(_io.dumps({**meta, "checksums": checksums}))
        if adata is not None:
            adata.write_h5ad(tmp / adata_name)

    if not prefix:
        _io.write_dir_atomically(dir_path, overwrite, write, own=_io.MODEL_FILES)
    else:
        _io.write_files_atomically(dir_path, overwrite, write, names)


def read_model(dir_path: str | os.PathLike, model_class: str, prefix: str | None = None) -> tuple[dict, dict]:
    """The checked metadata and the weights of a model directory.

    Raises
    ------
    ValueError
        When a file is not a schce model, is damaged, or does not match its checksum; the message names the file
        or the metadata field.
    """
    path = Path(dir_path)
    meta = _io.read_meta(path, prefix)
    meta_name, weights_name, _ = _io.model_files(prefix)
    meta_file, weights_file = path / meta_name, path / weights_name
    if meta.get("model_class") != model_class:
        raise ValueError(f"{path} holds a {meta.get('model_class')}, not a {model_class}.")
    validate_meta(meta, meta_file, check_sums=meta.get("format_version", 1) >= 2)
    if "checksums" in meta:
        expected = meta["checksums"]
        if file_sha256(weights_file) != expected["weights"]:
            raise ValueError(
                f"{weights_file} does not match the checksum recorded in {meta_file}: the weights were damaged or "
                "replaced by another model's. Save the model again, or restore both files from the same save."
            )
        found = _content_checksums(meta)
        edited = [k for k in ("labels", "genes", "hierarchy") if found[k] != expected[k]]
        if edited:
            raise ValueError(
                f"The {' and '.join(edited)} in {meta_file} differ from those the model was saved with (checksum "
                "mismatch): the file was edited or damaged. Restore it from the same save as model.pt."
            )
    else:
        logger.warning("%s was written before schce stored checksums; its files cannot be verified.", meta_file)
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise ValueError(f"{weights_file} is corrupt and cannot be read: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{weights_file} does not hold a state dict of tensors; save the model again.")
    return meta, state


def _fail(meta_file: Path, field: str, expected: str, value) -> None:
    shown = repr(value) if len(repr(value)) <= 80 else f"a {type(value).__name__}"
    raise ValueError(f"{meta_file}: {field} must be {expected}, got {shown}. The file is damaged or was edited.")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_strings(meta_file: Path, field: str, values, allow_empty: bool = False) -> None:
    if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
        _fail(meta_file, field, "a list of strings", values)
    if not values and not allow_empty:
        _fail(meta_file, field, "a non-empty list", values)
    if len(set(values)) != len(values):
        seen: set[str] = set()
        dup = sorted({v for v in values if v in seen or seen.add(v)})[:5]
        raise ValueError(f"{meta_file}: {field} has duplicates ({', '.join(dup)}). The file is damaged or was edited.")


def _check_indices(meta_file: Path, field: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not all(_is_int(i) and i >= 0 for i in value):
        _fail(meta_file, field, "null or a list of non-negative integers", value)


def _check_setup(meta_file: Path, meta: dict) -> None:
    registry = meta["registry"]
    if not isinstance(registry, dict):
        _fail(meta_file, "registry", "an object", registry)
    if not isinstance(registry.get("setup_args"), dict):
        _fail(meta_file, "registry.setup_args", "an object", registry.get("setup_args"))
    where = "setup" if meta.get("format_version", 1) >= 3 else f"registry.{SETUP_KEY}"
    setup = meta.get("setup") if where == "setup" else registry.get(SETUP_KEY)
    if not isinstance(setup, dict):
        _fail(meta_file, where, "an object", setup)
    hierarchy = setup.get("hierarchy")
    if not isinstance(hierarchy, dict):
        _fail(meta_file, f"{where}.hierarchy", "an object", hierarchy)
    _check_strings(meta_file, f"{where}.hierarchy.labels", hierarchy.get("labels"))
    edges = hierarchy.get("edges")
    if not isinstance(edges, list) or not all(isinstance(e, list | tuple) and len(e) == 2 for e in edges):
        _fail(meta_file, f"{where}.hierarchy.edges", "a list of [child, parent] pairs", edges)
    _check_strings(meta_file, f"{where}.genes", setup.get("genes"))
    if not isinstance(setup.get("normalize"), bool):
        _fail(meta_file, f"{where}.normalize", "true or false", setup.get("normalize"))


def validate_meta(meta: dict, meta_file: Path, check_sums: bool = True) -> None:
    """Check the type and range of every field of a model's metadata; a ``ValueError`` names the first bad one."""
    required = ("model_class", "init_params", "registry", "is_trained", "temperature", "history", "train_indices")
    since_3 = ("setup",) if meta.get("format_version", 1) >= 3 else ()
    missing = [k for k in (*required, *since_3, "validation_indices") if k not in meta]
    if missing:
        raise ValueError(
            f"{meta_file} lacks the required field(s) {', '.join(missing)}. The file is damaged or was edited; "
            "save the model again."
        )
    params = meta["init_params"]
    if not isinstance(params, dict) or not all(isinstance(params.get(k), dict) for k in ("non_kwargs", "kwargs")):
        _fail(meta_file, "init_params", "an object with 'non_kwargs' and 'kwargs' objects", params)
    _check_setup(meta_file, meta)
    if not isinstance(meta["is_trained"], bool):
        _fail(meta_file, "is_trained", "true or false", meta["is_trained"])
    t = meta["temperature"]
    if not isinstance(t, Real) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        _fail(meta_file, "temperature", "a positive finite number", t)
    if meta.get("optimizer") is not None and not isinstance(meta["optimizer"], str):
        _fail(meta_file, "optimizer", "null or a string", meta["optimizer"])
    best = meta.get("best_epoch")
    if best is not None and not (_is_int(best) and best >= -1):
        _fail(meta_file, "best_epoch", "null or an epoch number", best)
    history = meta["history"]
    if not isinstance(history, dict) or not all(
        isinstance(h, dict)
        and isinstance(h.get("epoch"), list)
        and isinstance(h.get("value"), list)
        and len(h["epoch"]) == len(h["value"])
        for h in history.values()
    ):
        _fail(meta_file, "history", "an object of {epoch: [...], value: [...]} of equal lengths", history)
    for field in ("train_indices", "validation_indices", "test_indices"):
        _check_indices(meta_file, field, meta.get(field))
    if check_sums:
        sums = meta.get("checksums")
        keys = ("weights", "labels", "genes", "hierarchy")
        if not isinstance(sums, dict) or not all(isinstance(sums.get(k), str) and len(sums[k]) == 64 for k in keys):
            _fail(meta_file, "checksums", f"an object of sha256 hex digests ({', '.join(keys)})", sums)


# ---------------------------------------------------------------------------------------------------- ensembles
ENSEMBLE_FORMAT = "schce-ensemble"
ENSEMBLE_FORMAT_VERSION = 1


def member_names(n_members: int) -> list[str]:
    """The member directories of an ensemble of ``n_members``: ``member-0``, ``member-1``, ..."""
    return [f"member-{i}" for i in range(n_members)]


def _listed_members(path: Path) -> list[str]:
    """The member directories an existing ensemble manifest at ``path`` names (none when there is none to read)."""
    try:
        listed = json.loads((path / _io.ENSEMBLE_FILE).read_text()).get("members")
    except (OSError, ValueError, AttributeError):
        return []
    return [m for m in listed if isinstance(m, str) and "/" not in m] if isinstance(listed, list) else []


def write_ensemble(dir_path: str | os.PathLike, overwrite: bool, saves: list, info: dict) -> None:
    """Write an ensemble directory atomically: ``member-<i>/`` by ``saves[i](directory)``, then the manifest.

    The manifest ``schce-ensemble.json`` holds ``info``, the member count and names, and the sha256 of every member's
    ``schce.json`` (which itself holds the checksum of its weights).

    An existing ``dir_path`` needs ``overwrite=True`` and may hold nothing but an ensemble's own entries (the
    manifest and member directories holding only model files), so a user's file is never deleted.
    """
    path = Path(dir_path)
    names = member_names(len(saves))
    members = {*names, *(_listed_members(path) if path.is_dir() else [])}
    own = {_io.ENSEMBLE_FILE, *members}
    _io.check_save_target(path, overwrite, own)
    for name in sorted(members):
        sub = path / name
        if sub.exists() and (
            sub.is_symlink() or not sub.is_dir() or any(p.name not in _io.MODEL_FILES for p in sub.iterdir())
        ):
            raise FileExistsError(
                f"{sub} holds files that schce did not write; overwrite=True only replaces an ensemble directory "
                "schce wrote. Choose another path, or move those files away first."
            )

    def write(tmp: Path) -> None:
        for name, save in zip(names, saves, strict=True):
            save(tmp / name)
        manifest = {
            "format": ENSEMBLE_FORMAT,
            "format_version": ENSEMBLE_FORMAT_VERSION,
            **info,
            "n_members": len(names),
            "members": names,
            "checksums": {name: file_sha256(tmp / name / _io.META_FILE) for name in names},
        }
        (tmp / _io.ENSEMBLE_FILE).write_text(_io.dumps(manifest))

    _io.write_dir_atomically(path, overwrite, write, own=own)


def read_ensemble(dir_path: str | os.PathLike, model_class: str) -> tuple[dict, list[Path]]:
    """The checked manifest of an ensemble directory and its member directories, in member order.

    Raises
    ------
    ValueError
        When the directory holds one model instead, or the manifest is damaged, lacks a member, or a member's
        ``schce.json`` does not match its checksum; the message names the file.
    """
    path = Path(dir_path)
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: the path does not exist.")
    manifest_file = path / _io.ENSEMBLE_FILE
    if not manifest_file.is_file():
        if (path / _io.META_FILE).is_file():
            raise ValueError(
                f"{path} holds one HCEClassifier ({_io.META_FILE}), not an {model_class}: load it with "
                f"schce.HCEClassifier.load({str(path)!r})."
            )
        raise ValueError(
            f"{path} is not a schce ensemble directory (expected {_io.ENSEMBLE_FILE}, as written by "
            f"{model_class}.save)."
        )
    try:
        manifest = _io.loads(manifest_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{manifest_file} is corrupt (not valid JSON: {err}). Save the ensemble again.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != ENSEMBLE_FORMAT:
        raise ValueError(f"{manifest_file} is not a schce ensemble manifest (format {ENSEMBLE_FORMAT!r} expected).")
    if not _is_int(manifest.get("format_version")) or manifest["format_version"] > ENSEMBLE_FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer schce (ensemble format {manifest.get('format_version')!r}); upgrade "
            "schce to load it."
        )
    _check_manifest(manifest_file, manifest, model_class)
    dirs = [path / name for name in manifest["members"]]
    for name, sub in zip(manifest["members"], dirs, strict=True):
        if not (sub / _io.META_FILE).is_file():
            raise ValueError(
                f"{sub} is missing: the manifest {manifest_file} lists {manifest['n_members']} members. Restore the "
                "whole directory from the same save."
            )
        if file_sha256(sub / _io.META_FILE) != manifest["checksums"][name]:
            raise ValueError(
                f"{sub / _io.META_FILE} does not match the checksum recorded in {manifest_file}: the member was "
                "damaged or replaced by another model. Restore the whole directory from the same save."
            )
    return manifest, dirs


def _check_manifest(manifest_file: Path, manifest: dict, model_class: str) -> None:
    """Every field of an ensemble manifest, with the first bad one named."""
    if manifest.get("model_class") != model_class:
        raise ValueError(f"{manifest_file} describes a {manifest.get('model_class')}, not a {model_class}.")
    n = manifest.get("n_members")
    if not (_is_int(n) and n >= 1):
        _fail(manifest_file, "n_members", "a positive integer", n)
    if manifest.get("members") != member_names(n):
        _fail(manifest_file, "members", f"the list {member_names(n)}", manifest.get("members"))
    seeds = manifest.get("seeds")
    if seeds is not None and not (isinstance(seeds, list) and len(seeds) == n and all(_is_int(s) for s in seeds)):
        _fail(manifest_file, "seeds", f"null or a list of {n} integers", seeds)
    sums = manifest.get("checksums")
    if not isinstance(sums, dict) or not all(
        isinstance(sums.get(m), str) and len(sums[m]) == 64 for m in manifest["members"]
    ):
        _fail(manifest_file, "checksums", "an object of one sha256 hex digest per member", sums)
