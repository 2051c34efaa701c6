"""scTab store layouts: the published dense parquet store, schce's compact CSR store, writing and reading them.

Published (dense) layout, as scTab's 164 GB training store::

    train/ val/ test/            part.N.parquet, 1024-row row groups, snappy
                                 X: list<float32> (one dense vector over all genes per cell)
                                 int64 codes: cell_type, dataset_id, donor_id, assay, tissue, tissue_general,
                                 disease, development_stage, tech_sample, soma_joinid, idx; bool is_primary_data
    var.parquet                  feature_id, feature_name
    categorical_lookup/<col>.parquet   an integer index and a ``label`` column, one per code column
    cell_type_hierarchy/child_matrix.npy   (labels, labels): row = ancestor, column = descendant-or-self
    class_weights.npy            per cell_type code
    augmentations.npy            (n, genes) float32 gene-wise offsets (used by scTab's augmentation; not by schce)

Compact layout: the same files, with the split parts holding CSR rows instead of ``X``
(``indices: list<uint16|int32>``, delta-coded within each cell, ``values: list<uint8|uint16|uint32|float16|float32>``,
zstd) and ``compact.json`` at the top; every part carries its own metadata in the parquet key-value metadata.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from anndata import AnnData
from tqdm.auto import tqdm

from schce import _io
from schce.data._expression import get_matrix, read_rows

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CODE_COLUMNS = (
    "cell_type",
    "dataset_id",
    "donor_id",
    "assay",
    "tissue",
    "tissue_general",
    "disease",
    "development_stage",
    "tech_sample",
)
INT_COLUMNS = ("soma_joinid", "idx")
ROW_GROUP_SIZE = 1024
COMPACT_META = "compact.json"
COMPACT_FORMAT = "schce-compact-sctab-store"
COMPACT_VERSION = 1
_PART_META_KEY = b"schce_compact"


# ---------------------------------------------------------------------------------------------- layout checks
def store_layout(path: str | os.PathLike) -> str:
    """``"dense"`` (published scTab layout) or ``"compact"``; a clear error when ``path`` is neither."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No scTab store at {path}: not a directory.")
    needed = ["var.parquet", "categorical_lookup/cell_type.parquet", *SPLITS]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise ValueError(
            f"{path} is not a scTab store: missing {missing}. A store has train/, val/, test/ parquet parts, "
            "var.parquet and categorical_lookup/ (write one with schce.data.write_sctab_store)."
        )
    if (path / COMPACT_META).is_file():
        meta = json.loads((path / COMPACT_META).read_text())
        if meta.get("format") != COMPACT_FORMAT or meta.get("format_version", 0) > COMPACT_VERSION:
            raise ValueError(f"{path / COMPACT_META} is not a compact store this schce version can read.")
        return "compact"
    return "dense"


def split_parts(path: str | os.PathLike, split: str) -> list[Path]:
    """The split's parquet parts in part order (``part.10`` after ``part.9``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    parts = list((Path(path) / split).glob("*.parquet"))

    def key(p: Path):
        digits = "".join(c for c in p.stem if c.isdigit())
        return (int(digits) if digits else -1, p.name)

    return sorted(parts, key=key)


def read_var(path: str | os.PathLike) -> pd.DataFrame:
    """``var.parquet``: ``feature_id`` and ``feature_name`` per gene, in input order."""
    var = pd.read_parquet(Path(path) / "var.parquet")
    if "feature_id" not in var.columns and "feature_name" not in var.columns:
        raise ValueError(
            f"{path}/var.parquet has neither 'feature_id' nor 'feature_name' (columns: {list(var.columns)})."
        )
    return var.reset_index(drop=True)


def read_lookup(path: str | os.PathLike, column: str) -> list[str]:
    """Labels of a code column, ordered by code, from ``categorical_lookup/<column>.parquet``."""
    from schce._sctab import read_labels

    return read_labels(Path(path) / "categorical_lookup" / f"{column}.parquet")


# ---------------------------------------------------------------------------------------------- hierarchy check
def compare_hierarchy(child_matrix: np.ndarray, labels, ontology=None) -> pd.DataFrame:
    """Relations where a store's ``child_matrix`` and the Cell Ontology disagree.

    Parameters
    ----------
    child_matrix
        ``(n_labels, n_labels)``, ``[i, j]`` non-zero iff label ``j`` is label ``i`` or one of its descendants.
    labels
        CL IDs of the labels, in code order.
    ontology
        :class:`~schce.ontology.CellOntology` or source; default: the embedded release.

    Returns
    -------
    One row per disagreeing ``(ancestor, descendant)`` pair of labels: ``ancestor``, ``descendant``, their names,
    ``in_store`` and ``in_ontology`` (exactly one is true). Empty when they agree.
    """
    from schce.hierarchy import Hierarchy
    from schce.ontology import load_cell_ontology

    onto = load_cell_ontology(ontology)
    labels = [str(x) for x in labels]
    store = np.asarray(child_matrix) != 0
    if store.shape != (len(labels), len(labels)):
        raise ValueError(
            f"child_matrix has shape {store.shape}; expected ({len(labels)}, {len(labels)}) for the labels."
        )
    ref = Hierarchy.from_ontology(labels, onto).R
    i, j = np.nonzero(store != ref)
    return pd.DataFrame(
        {
            "ancestor": [labels[k] for k in i],
            "descendant": [labels[k] for k in j],
            "ancestor_name": [onto.name(labels[k]) for k in i],
            "descendant_name": [onto.name(labels[k]) for k in j],
            "in_store": store[i, j],
            "in_ontology": ref[i, j],
        }
    )


# ---------------------------------------------------------------------------------------------- writing
def _split_assignment(adata: AnnData, split_key, labels, validation_size, test_size, seed) -> np.ndarray:
    """``train``/``val``/``test`` per cell: from ``obs[split_key]`` when it holds those names, else by groups."""
    from schce.data._loader import split_cells

    codes = pd.factorize(labels)[0]
    if split_key is not None:
        values = adata.obs[split_key].astype(str).to_numpy()
        names = set(np.unique(values))
        if names <= {"train", "val", "validation", "test"}:
            out = np.where(values == "validation", "val", values)
            if "train" not in names:
                raise ValueError(f"obs[{split_key!r}] names no cell 'train'; a store needs training cells.")
            return out
        tr, va, te = split_cells(codes, validation_size, test_size, seed, groups=values)
    else:
        tr, va, te = split_cells(codes, validation_size, test_size, seed)
    out = np.empty(adata.n_obs, dtype=object)
    out[tr], out[va], out[te] = "train", "val", "test"
    return out.astype(str)


def _dense_part_schema() -> pa.Schema:
    fields = [pa.field("X", pa.list_(pa.float32()))]
    fields += [pa.field(c, pa.int64()) for c in (*CODE_COLUMNS, *INT_COLUMNS)]
    fields.append(pa.field("is_primary_data", pa.bool_()))
    return pa.schema(fields)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def write_sctab_store(
    adata: AnnData,
    path: str | os.PathLike,
    split_key: str | None = None,
    labels_key: str = "cell_type",
    layer: str | None = None,
    validation_size: float = 0.1,
    test_size: float = 0.1,
    seed: int = 0,
    rows_per_part: int = 32 * ROW_GROUP_SIZE,
    n_augmentations: int = 16,
    ontology=None,
    overwrite: bool = False,
) -> Path:
    """Write an AnnData in the published scTab store layout (the layout of scTab's 164 GB training store).

    Cells are written in row groups of 1024 (dense ``X: list<float32>`` vectors over all genes), one chunk at a time:
    the whole matrix is never densified. The store appears at ``path`` only once complete.

    Parameters
    ----------
    adata
        Cells × genes with census-style ``obs`` columns (``dataset_id``, ``donor_id``, ``assay``, ``tissue``,
        ``tissue_general``, ``disease``, ``development_stage``; missing ones are written as ``"unknown"``;
        ``tech_sample`` defaults to dataset + donor). Not modified.
    path
        Store directory.
    split_key
        ``obs`` column: either ``"train"``/``"val"``/``"test"`` per cell, or groups (donors) split whole into
        train / validation / test (as scTab splits by donor). Default: random, stratified by label.
    labels_key
        ``obs`` column with the cell types (CL names or IDs); written as the ``cell_type`` codes and lookup.
    layer
        Layer with the expression; default ``adata.X``. Values are written as they are (scTab's store holds
        normalised ``log1p`` values; raw counts work too and are normalised by the model).
    validation_size, test_size, seed
        Fractions and seed of the split when ``split_key`` does not name the splits.
    rows_per_part
        Cells per ``part.N.parquet``.
    n_augmentations
        Rows of ``augmentations.npy``.
    ontology
        Ontology for ``child_matrix.npy``; default: the embedded CL release.
    overwrite
        Replace an existing store.

    Returns
    -------
    The store path.
    """
    from schce.hierarchy import Hierarchy
    from schce.ontology import load_cell_ontology

    # Everything is checked before anything is written.
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists. Pass overwrite=True to replace it, or choose another path.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells × {adata.n_vars} genes); nothing to write.")
    for key, what in ((labels_key, "labels_key"), (split_key, "split_key")):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(
                f"{what}={key!r} is not a column of adata.obs. Available columns: {list(adata.obs.columns)}."
            )
    if rows_per_part < ROW_GROUP_SIZE or rows_per_part % ROW_GROUP_SIZE:
        raise ValueError(f"rows_per_part must be a positive multiple of {ROW_GROUP_SIZE}, got {rows_per_part}.")
    X = get_matrix(adata, layer)
    labels = adata.obs[labels_key]
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} cell(s) have no label in obs[{labels_key!r}]; drop them first.")
    labels = labels.astype(str).to_numpy()
    onto = load_cell_ontology(ontology)
    label_names = sorted(set(labels))
    mapping = onto.map_labels(label_names)
    label_ids = [mapping[n] for n in label_names]
    if len(set(label_ids)) != len(label_ids):
        raise ValueError(
            f"Several values of obs[{labels_key!r}] name the same CL term; harmonise them before writing a store."
        )
    assignment = _split_assignment(adata, split_key, labels, validation_size, test_size, seed)

    obs = adata.obs
    columns: dict[str, np.ndarray] = {"cell_type": labels}
    absent = [c for c in CODE_COLUMNS[1:] if c not in obs.columns and c != "tech_sample"]
    if absent:
        logger.warning("obs has no %s; written as 'unknown'.", absent)
    for c in CODE_COLUMNS[1:]:
        if c in obs.columns:
            columns[c] = obs[c].astype(str).to_numpy()
        elif c == "tech_sample":
            columns[c] = (pd.Series(columns["dataset_id"]) + "_" + pd.Series(columns["donor_id"])).to_numpy()
        else:
            columns[c] = np.full(adata.n_obs, "unknown", dtype=object)
    lookups = {c: sorted(set(v)) if c != "cell_type" else label_names for c, v in columns.items()}
    codes = {c: pd.Categorical(columns[c], categories=lookups[c]).codes.astype(np.int64) for c in columns}
    codes["soma_joinid"] = (
        obs["soma_joinid"].to_numpy(np.int64)
        if "soma_joinid" in obs.columns
        else np.arange(adata.n_obs, dtype=np.int64)
    )
    codes["idx"] = np.arange(adata.n_obs, dtype=np.int64)
    primary = obs["is_primary_data"].to_numpy(bool) if "is_primary_data" in obs.columns else np.ones(adata.n_obs, bool)

    n_labels = len(label_names)
    train_rows = np.flatnonzero(assignment == "train")
    counts = np.bincount(codes["cell_type"][train_rows], minlength=n_labels).astype(np.float64)
    weights = np.zeros(n_labels)
    weights[counts > 0] = len(train_rows) / ((counts > 0).sum() * counts[counts > 0])
    child_matrix = Hierarchy.from_ontology(label_ids, onto).R.astype(np.float32)
    rng = np.random.default_rng(seed)
    augment = np.where(
        rng.random((n_augmentations, adata.n_vars)) < 0.05, rng.normal(0, 0.5, (n_augmentations, adata.n_vars)), 0
    ).astype(np.float32)
    var = pd.DataFrame(
        {
            "feature_id": adata.var["feature_id"].astype(str).to_numpy()
            if "feature_id" in adata.var.columns
            else adata.var_names.astype(str).to_numpy(),
            "feature_name": adata.var["feature_name"].astype(str).to_numpy()
            if "feature_name" in adata.var.columns
            else adata.var_names.astype(str).to_numpy(),
        }
    )
    schema = _dense_part_schema()
    n_genes = adata.n_vars

    def write(tmp: Path) -> None:
        _write_common(tmp, var, lookups, child_matrix, weights, augment)
        bar = tqdm(total=adata.n_obs, desc="Writing store", unit="cell", disable=adata.n_obs < 50_000)
        for split in SPLITS:
            rows = np.flatnonzero(assignment == split)
            (tmp / split).mkdir()
            for part, start in enumerate(range(0, max(len(rows), 1), rows_per_part)):
                part_rows = rows[start : start + rows_per_part]
                with pq.ParquetWriter(tmp / split / f"part.{part}.parquet", schema, compression="snappy") as writer:
                    for g in range(0, len(part_rows), ROW_GROUP_SIZE):
                        r = part_rows[g : g + ROW_GROUP_SIZE]
                        dense = read_rows(X, r).ravel()
                        arrays = [_list_array(np.arange(len(r) + 1) * n_genes, dense)]
                        arrays += [pa.array(codes[c][r]) for c in (*CODE_COLUMNS, *INT_COLUMNS)]
                        arrays.append(pa.array(primary[r]))
                        writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=ROW_GROUP_SIZE)
                        bar.update(len(r))
                    if len(part_rows) == 0:
                        writer.write_table(schema.empty_table())
        bar.close()

    _io.write_dir_atomically(path, overwrite, write)
    logger.info(
        "Wrote a scTab store of %d cells (%s) to %s.",
        adata.n_obs,
        ", ".join(f"{s}: {(assignment == s).sum()}" for s in SPLITS),
        path,
    )
    return path


def _write_common(tmp: Path, var: pd.DataFrame, lookups: dict, child_matrix, weights, augment) -> None:
    var.to_parquet(tmp / "var.parquet", index=False)
    (tmp / "categorical_lookup").mkdir()
    for c, values in lookups.items():
        lookup = pd.DataFrame({"idx": np.arange(len(values), dtype=np.int64), "label": list(values)})
        lookup.to_parquet(tmp / "categorical_lookup" / f"{c}.parquet", index=False)
    (tmp / "cell_type_hierarchy").mkdir()
    np.save(tmp / "cell_type_hierarchy" / "child_matrix.npy", child_matrix)
    np.save(tmp / "class_weights.npy", np.asarray(weights, dtype=np.float32))
    np.save(tmp / "augmentations.npy", augment)


# ---------------------------------------------------------------------------------------------- compact
def _value_type(values: np.ndarray, float_dtype: str) -> tuple[pa.DataType, np.dtype]:
    """Smallest exact integer type for integral non-negative values, else the float type asked for."""
    if len(values) == 0:
        return pa.uint8(), np.dtype(np.uint8)
    vmin, vmax = float(values.min()), float(values.max())
    if vmin >= 0 and np.all(values == np.round(values)):
        for pa_t, np_t in ((pa.uint8(), np.uint8), (pa.uint16(), np.uint16), (pa.uint32(), np.uint32)):
            if vmax <= np.iinfo(np_t).max:
                return pa_t, np.dtype(np_t)
    return (pa.float16(), np.dtype(np.float16)) if float_dtype == "float16" else (pa.float32(), np.dtype(np.float32))


def convert_sctab_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    float_dtype: str = "float16",
    compression: str = "zstd",
    overwrite: bool = False,
) -> Path:
    """Convert a dense scTab store into the compact CSR layout, part by part and row group by row group.

    Each part keeps its cells, order and 1024-row row groups; ``X`` becomes ``indices`` (``uint16`` when there are
    fewer than 65,536 genes; delta-coded: each cell's first gene index, then the gaps between its sorted indices) and
    ``values``: the smallest unsigned integer type when a part holds integer counts
    (exact), else ``float16`` (``float_dtype="float32"`` keeps full precision). Code columns are copied. Every part
    stores its own metadata (genes, value type, cells, non-zeros) in its parquet key-value metadata; ``compact.json``
    sums them up. ``var.parquet``, ``categorical_lookup/``, ``cell_type_hierarchy/`` and the ``.npy`` files are
    copied.

    Parameters
    ----------
    src
        A store in the published (dense) layout.
    dst
        Output directory.
    float_dtype
        ``"float16"`` or ``"float32"``, for non-integer values.
    compression
        Parquet codec for the parts.
    overwrite
        Replace an existing ``dst``.
    """
    src, dst = Path(src), Path(dst)
    if store_layout(src) != "dense":
        raise ValueError(f"{src} is already a compact store.")
    if float_dtype not in ("float16", "float32"):
        raise ValueError(f"float_dtype must be 'float16' or 'float32', got {float_dtype!r}.")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists. Pass overwrite=True to replace it, or choose another path.")
    n_genes = len(read_var(src))
    index_np = np.uint16 if n_genes < 2**16 else np.int32
    index_pa = pa.uint16() if n_genes < 2**16 else pa.int32()
    summary = {
        "format": COMPACT_FORMAT,
        "format_version": COMPACT_VERSION,
        "n_genes": n_genes,
        "index_coding": "delta",
        "splits": {},
    }

    def write(tmp: Path) -> None:
        for name in ("var.parquet", "class_weights.npy", "augmentations.npy"):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        for name in ("categorical_lookup", "cell_type_hierarchy"):
            if (src / name).exists():
                shutil.copytree(src / name, tmp / name)
        for split in SPLITS:
            (tmp / split).mkdir()
            stats = {"n_cells": 0, "nnz": 0, "parts": 0}
            for part in split_parts(src, split):
                n, nnz = _convert_part(
                    part, tmp / split / part.name, n_genes, index_np, index_pa, float_dtype, compression
                )
                stats["n_cells"] += n
                stats["nnz"] += nnz
                stats["parts"] += 1
            summary["splits"][split] = stats
        (tmp / COMPACT_META).write_text(json.dumps(summary, indent=1))

    _io.write_dir_atomically(dst, overwrite, write)
    logger.info("Converted %s to the compact layout at %s.", src, dst)
    return dst


def _convert_part(src: Path, dst: Path, n_genes, index_np, index_pa, float_dtype, compression) -> tuple[int, int]:
    pf = pq.ParquetFile(src)
    other = [f for f in pf.schema_arrow if f.name != "X"]
    # Two passes over the part: the first only decides the value type, so every row group shares one schema.
    value_pa, value_np = pa.uint8(), np.dtype(np.uint8)
    for g in range(pf.num_row_groups):
        x = _dense_values(pf.read_row_group(g, columns=["X"]), n_genes)
        nz = x[x != 0]
        t_pa, t_np = _value_type(nz, float_dtype)
        if t_np.kind == "f" or (value_np.kind != "f" and t_np.itemsize > value_np.itemsize):
            value_pa, value_np = t_pa, t_np
        if value_np.kind == "f":
            break
    schema = pa.schema([pa.field("indices", pa.list_(index_pa)), pa.field("values", pa.list_(value_pa)), *other])
    n_cells = nnz = 0
    writer = pq.ParquetWriter(dst, schema, compression=compression)
    try:
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            x = _dense_values(table.select(["X"]), n_genes)
            rows, cols = np.nonzero(x)
            offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(x)))])
            arrays = [
                _list_array(offsets, delta_encode(cols, offsets).astype(index_np)),
                _list_array(offsets, x[rows, cols].astype(value_np)),
                *(table.column(f.name).combine_chunks() for f in other),
            ]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=ROW_GROUP_SIZE)
            n_cells += len(x)
            nnz += len(rows)
        meta = {
            "n_genes": n_genes,
            "values": str(value_np),
            "indices": np.dtype(index_np).name,
            "index_coding": "delta",
        }
        meta.update({"n_cells": n_cells, "nnz": nnz, "source": src.name})
        writer.add_key_value_metadata({_PART_META_KEY: json.dumps(meta).encode()})
    finally:
        writer.close()
    return n_cells, nnz


def delta_encode(cols: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Gaps between a cell's sorted gene indices (its first index as is): small numbers that compress well."""
    gaps = cols.astype(np.int64)
    gaps[1:] -= cols[:-1]
    starts = offsets[:-1][np.diff(offsets) > 0]
    gaps[starts] = cols[starts]
    return gaps


def delta_decode(gaps: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of :func:`delta_encode` for the entries ``offsets[0]:offsets[-1]``; int64 gene indices."""
    total = np.cumsum(gaps[offsets[0] : offsets[-1]], dtype=np.int64)
    before = np.concatenate([[0], total])[offsets[:-1] - offsets[0]]
    return total - np.repeat(before, np.diff(offsets))


def _dense_values(table: pa.Table, n_genes: int) -> np.ndarray:
    """The ``X`` column of a dense part as a ``(cells, genes)`` float32 array (zero-copy where arrow allows)."""
    col = table.column("X").combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if len(flat) != len(col) * n_genes:
        raise ValueError(f"X rows do not all hold {n_genes} values (the store's var.parquet length).")
    return flat.reshape(len(col), n_genes)


def read_part_metadata(part: str | os.PathLike) -> dict | None:
    """The compact metadata of one part (``None`` for a dense part)."""
    meta = pq.read_metadata(part).metadata or {}
    return json.loads(meta[_PART_META_KEY]) if _PART_META_KEY in meta else None


# ---------------------------------------------------------------------------------------------- reading as AnnData
def read_sctab_store(
    path: str | os.PathLike, split: str = "test", max_cells: int | None = None, decode: bool = True
) -> AnnData:
    """Read one split of a store (either layout) as an AnnData with a CSR ``X``, row group by row group.

    For prediction and evaluation on a store's test split with :meth:`~schce.HCEClassifier.predict` /
    :meth:`~schce.HCEClassifier.evaluate`; memory is that of the sparse matrix (use ``max_cells`` on a large split,
    or ``model.evaluate(datamodule=...)``, which streams).

    Parameters
    ----------
    path
        Store directory.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    max_cells
        Read only the first cells.
    decode
        Replace code columns by their labels (categoricals) from ``categorical_lookup``.

    Returns
    -------
    AnnData: ``X`` float32 CSR, ``obs`` with the code columns (``idx`` as index), ``var`` from ``var.parquet``
    indexed by ``feature_id``.
    """
    import scipy.sparse as sp

    from schce.data._datamodule import _read_block

    layout = store_layout(path)
    var = read_var(path)
    n_genes = len(var)
    blocks, obs_parts, n = [], [], 0
    for part in split_parts(path, split):
        pf = pq.ParquetFile(part)
        for g in range(pf.num_row_groups):
            if max_cells is not None and n >= max_cells:
                break
            block = _read_block(pf, g, layout, n_genes, columns=None)
            keep = len(block) if max_cells is None else min(len(block), max_cells - n)
            blocks.append(block.to_csr(keep))
            obs_parts.append(block.table.slice(0, keep).to_pandas())
            n += keep
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)
    obs = pd.concat(obs_parts, ignore_index=True) if obs_parts else pd.DataFrame()
    if decode:
        for c in CODE_COLUMNS:
            lookup = Path(path) / "categorical_lookup" / f"{c}.parquet"
            if c in obs.columns and lookup.exists():
                obs[c] = pd.Categorical.from_codes(obs[c].to_numpy(), categories=read_lookup(path, c))
    if "idx" in obs.columns:
        obs.index = obs["idx"].astype(str).to_numpy()
    var_index = var["feature_id"] if "feature_id" in var.columns else var["feature_name"]
    var = var.set_index(pd.Index(var_index.astype(str).to_numpy()))
    return AnnData(X=X, obs=obs, var=var)
