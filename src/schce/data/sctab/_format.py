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

Compact layout (format 2): the same files, with the split parts holding sparse rows instead of ``X``, one byte
string per cell in each of two binary columns (zstd), and ``compact.json`` at the top::

    indices: binary              the cell's non-zero genes in the part's gene order (most expressed first) as LEB128
                                 varints of the gaps between them; with integer counts each is 2 * gap + (count > 1)
    values: binary               integer counts: count - 2 of the counts above 1, as varints (exact);
                                 other values: float16 (or float32) bytes

Every part carries its own metadata (value coding, cells, non-zeros) and its gene order in the parquet key-value
metadata. Coding the gaps in frequency order and the counts of 1 as one bit of the gap brings a cell to about
5.6 bits per non-zero gene on raw UMI counts (the per-gene entropy bound of the gaps and values is about 4.8 bits).
Format 1 (``indices: list<uint16|int32>`` delta-coded in gene order, ``values: list<uint8|...|float32>``) is still
read.
"""

from __future__ import annotations

import base64
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
COMPACT_VERSION = 2
INDEX_CODING = "rank-gap-varint"
_PART_META_KEY = b"schce_compact"
_GENE_ORDER_KEY = b"schce_compact_gene_order"


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
def _value_coding(values: np.ndarray, float_dtype: str) -> str:
    """``"count"`` for integral values in ``[0, 2**32)`` (kept exact), else the float type asked for."""
    if len(values) == 0:
        return "count"
    if values.min() >= 0 and values.max() < 2**32 and np.all(values == np.round(values)):
        return "count"
    return float_dtype


def varint_encode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LEB128 bytes of non-negative integers (7 bits a byte, low bits first, high bit set on all but the last byte).

    Returns the bytes and the number of bytes of each integer. Numbers below 128 take one byte, below 16,384 two.
    """
    x = np.asarray(x, dtype=np.int64)
    if len(x) == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    if x.min() < 0:
        raise ValueError("varint_encode codes non-negative integers only.")
    n_bytes = np.ones(len(x), dtype=np.int64)
    k, top = 1, int(x.max())
    while top >> (7 * k):
        n_bytes += x >> (7 * k) > 0
        k += 1
    if k == 1:  # all below 128: one byte each
        return x.astype(np.uint8), n_bytes
    out = np.empty(int(n_bytes.sum()), dtype=np.uint8)
    pos = np.cumsum(n_bytes) - n_bytes
    out[pos] = (x & 127) | ((n_bytes > 1) << 7)
    big = np.flatnonzero(n_bytes > 1)  # few: the rest of the bytes only for them
    for j in range(1, k):
        big = big[n_bytes[big] > j]
        out[pos[big] + j] = ((x[big] >> (7 * j)) & 127) | ((n_bytes[big] > j + 1) << 7)
    return out, n_bytes


def varint_decode(data: np.ndarray, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`varint_encode`: the numbers of a byte string of whole LEB128 numbers.

    Returns the numbers (``dtype``, which must hold them) and the positions of the bytes that continue a number:
    ``b - np.searchsorted(positions, b)`` numbers end before byte ``b``.
    """
    data = np.asarray(data, dtype=np.uint8)
    more = np.flatnonzero(data >= 128)  # few: most numbers take one byte
    out = data.astype(dtype)
    if len(more) == 0:
        return out, more
    if more[-1] == len(data) - 1:
        raise ValueError("Truncated varint data: the last number has no final byte.")
    out[more] -= 128
    # Runs of continuation bytes and the final byte after each: shift every byte into its final byte.
    run_start = np.ones(len(more), dtype=bool)
    run_start[1:] = more[1:] != more[:-1] + 1
    starts = more[run_start]
    run = np.cumsum(run_start) - 1
    shift = 7 * (more - starts[run])
    ends = more[np.append(run_start[1:], True)] + 1
    lengths = ends - starts
    total = np.zeros(len(starts), dtype=dtype)
    np.add.at(total, run, out[more] << shift)
    out[ends] = total + (out[ends] << (7 * lengths))
    keep = np.ones(len(data), dtype=bool)
    keep[more] = False
    return out[keep], more


def _cell_offsets(entry_offsets: np.ndarray, n_bytes: np.ndarray) -> np.ndarray:
    """Byte offsets of each cell from its entries' offsets and each entry's byte count."""
    return np.concatenate([[0], np.cumsum(n_bytes)])[entry_offsets]


def _binary_array(offsets: np.ndarray, data: np.ndarray) -> pa.BinaryArray:
    return pa.BinaryArray.from_buffers(
        pa.binary(), len(offsets) - 1, [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    )


def _binary_parts(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell offsets (from 0) and the bytes of a binary column, without copying the bytes."""
    arr = col.combine_chunks()
    if arr.null_count:
        raise ValueError("A compact part holds missing (null) rows; the store is damaged, convert it again.")
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return offsets - offsets[0], data[offsets[0] : offsets[-1]]


def encode_cells(x: np.ndarray, rank: np.ndarray, coding: str) -> tuple[pa.BinaryArray, pa.BinaryArray, int]:
    """The ``indices`` and ``values`` columns (format 2) of dense rows ``x``; also returns the number of non-zeros.

    ``rank`` is each gene's position in the part's gene order; a cell's non-zero genes are coded in that order as
    gaps (``rank - previous rank - 1``, the first from -1). With integer counts (``coding="count"``) a gap is
    stored as ``2 * gap + (count > 1)``, so a count of 1 costs no byte of its own, and ``values`` holds ``count - 2``
    for the other counts; ``indices`` and these values are LEB128 varints. Float values are stored as they are.
    """
    order = np.argsort(rank)
    xr = x[:, order]
    rows, ranks = np.nonzero(xr)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(x)))])
    values = xr[rows, ranks]
    ranks = ranks.astype(np.int64)
    gaps = ranks - np.concatenate([[-1], ranks[:-1]]) - 1
    starts = offsets[:-1][np.diff(offsets) > 0]
    gaps[starts] = ranks[starts]
    if coding == "count":
        more = values > 1
        code_bytes, code_len = varint_encode(2 * gaps + more)
        value_bytes, value_len = varint_encode(values[more].astype(np.int64) - 2)
        entry_len = np.zeros(len(values), dtype=np.int64)
        entry_len[more] = value_len
        value_offsets = _cell_offsets(offsets, entry_len)
    else:
        code_bytes, code_len = varint_encode(gaps)
        value_bytes = np.ascontiguousarray(values.astype(coding)).view(np.uint8)
        value_offsets = offsets * np.dtype(coding).itemsize
    return (
        _binary_array(_cell_offsets(offsets, code_len), code_bytes),
        _binary_array(value_offsets, value_bytes),
        len(values),
    )


def decode_cells(
    indices: pa.ChunkedArray, values: pa.ChunkedArray, gene_order: np.ndarray, coding: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_cells`: per-cell offsets, gene indices (int32) and values of the rows."""
    cell_bytes, code_bytes = _binary_parts(indices)
    # int32 suffices: a code is at most 2 * n_genes + 1.
    codes, more_bytes = varint_decode(code_bytes, np.int32)
    offsets = cell_bytes - np.searchsorted(more_bytes, cell_bytes)
    if coding == "count":
        above_one = (codes & 1).view(np.uint32).astype(bool)
        codes >>= 1
    # Ranks from gaps: a running sum of gap + 1, restarted at every cell (int32: a row group sums to < 2**31).
    codes += 1
    total = np.cumsum(codes, dtype=np.int32)
    before = (np.concatenate([[0], total])[offsets[:-1]] + 1).astype(np.int32)
    total -= np.repeat(before, np.diff(offsets))
    genes = gene_order.astype(np.int32)[total]
    _, value_bytes = _binary_parts(values)
    if coding == "count":
        rest, _ = varint_decode(value_bytes)
        if len(rest) != above_one.sum():
            raise ValueError("A compact part's values do not match its indices; the store is damaged.")
        out = np.ones(len(genes), dtype=np.float32)
        np.place(out, above_one, (rest + 2).astype(np.float32))
    else:
        out = value_bytes.view(coding)
        if len(out) != len(genes):
            raise ValueError("A compact part's values do not match its indices; the store is damaged.")
    return offsets, genes, out


def convert_sctab_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    float_dtype: str = "float16",
    compression: str = "zstd",
    compression_level: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a dense scTab store into the compact CSR layout, part by part and row group by row group.

    Each part keeps its cells, order and 1024-row row groups; ``X`` becomes two binary columns, one byte string per
    cell. ``indices`` codes the cell's non-zero genes as gaps in the part's gene order (the genes sorted by how many
    cells express them, so the frequent genes give small gaps), as LEB128 varints. With integer counts (exact) a
    gap also carries one bit telling whether the count is above 1, and ``values`` holds only those counts, minus 2,
    as varints; other values are stored as ``float16`` (``float_dtype="float32"`` keeps full precision). Code
    columns are copied. Every part stores its own metadata (genes, value coding, cells, non-zeros, gene order) in
    its parquet key-value metadata; ``compact.json`` sums them up. ``var.parquet``, ``categorical_lookup/``,
    ``cell_type_hierarchy/`` and the ``.npy`` files are copied.

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
    compression_level
        Codec level; default: the codec's default (zstd: 1). Higher zstd levels write much more slowly; levels 16
        and up shrink integer counts by about another 5%.
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
    summary = {
        "format": COMPACT_FORMAT,
        "format_version": COMPACT_VERSION,
        "n_genes": n_genes,
        "index_coding": INDEX_CODING,
        "splits": {},
    }
    options = {"compression": compression, "compression_level": compression_level}

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
                n, nnz = _convert_part(part, tmp / split / part.name, n_genes, float_dtype, options)
                stats["n_cells"] += n
                stats["nnz"] += nnz
                stats["parts"] += 1
            summary["splits"][split] = stats
        (tmp / COMPACT_META).write_text(json.dumps(summary, indent=1))

    _io.write_dir_atomically(dst, overwrite, write)
    logger.info("Converted %s to the compact layout at %s.", src, dst)
    return dst


def _convert_part(src: Path, dst: Path, n_genes: int, float_dtype: str, options: dict) -> tuple[int, int]:
    pf = pq.ParquetFile(src)
    other = [f for f in pf.schema_arrow if f.name != "X"]
    # Two passes over the part: the first decides the value coding and counts the cells expressing each gene.
    coding, expressed = "count", np.zeros(n_genes, dtype=np.int64)
    for g in range(pf.num_row_groups):
        x = _dense_values(pf.read_row_group(g, columns=["X"]), n_genes)
        expressed += np.count_nonzero(x, axis=0)
        if coding == "count":
            coding = _value_coding(x[x != 0], float_dtype)
    gene_order = np.argsort(-expressed, kind="stable")
    rank = np.empty(n_genes, dtype=np.int64)
    rank[gene_order] = np.arange(n_genes)
    schema = pa.schema([pa.field("indices", pa.binary()), pa.field("values", pa.binary()), *other])
    rest = [f.name for f in other]
    n_cells = nnz = 0
    # Dictionaries and statistics only for the code columns: the byte strings of cells have no use for them.
    writer = pq.ParquetWriter(dst, schema, use_dictionary=rest, write_statistics=rest, **options)
    try:
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            x = _dense_values(table.select(["X"]), n_genes)
            indices, values, n = encode_cells(x, rank, coding)
            arrays = [indices, values, *(table.column(name).combine_chunks() for name in rest)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=ROW_GROUP_SIZE)
            n_cells += len(x)
            nnz += n
        order_dtype = "<u2" if n_genes <= 2**16 else "<u4"
        meta = {
            "format_version": COMPACT_VERSION,
            "n_genes": n_genes,
            "values": coding,
            "index_coding": INDEX_CODING,
            "gene_order": order_dtype,
            "n_cells": n_cells,
            "nnz": nnz,
            "source": src.name,
        }
        order_bytes = base64.b64encode(gene_order.astype(order_dtype).tobytes())
        writer.add_key_value_metadata({_PART_META_KEY: json.dumps(meta).encode(), _GENE_ORDER_KEY: order_bytes})
    finally:
        writer.close()
    return n_cells, nnz


def delta_decode(gaps: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Gene indices of format-1 parts (each cell's first index, then the gaps) for ``offsets[0]:offsets[-1]``."""
    total = np.cumsum(gaps[offsets[0] : offsets[-1]], dtype=np.int64)
    before = np.concatenate([[0], total])[offsets[:-1] - offsets[0]]
    return total - np.repeat(before, np.diff(offsets))


def read_compact_rows(pf: pq.ParquetFile, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell offsets (from 0), gene indices and values of the ``indices``/``values`` columns read from ``pf``.

    Reads both formats: 2 (binary columns, see :func:`encode_cells`) and 1 (``list`` columns of delta-coded
    indices and plain values, as earlier versions wrote).
    """
    kv = pf.metadata.metadata or {}
    meta = json.loads(kv[_PART_META_KEY]) if _PART_META_KEY in kv else {}
    if meta.get("format_version", 1) >= 2:
        order = np.frombuffer(base64.b64decode(kv[_GENE_ORDER_KEY]), dtype=meta["gene_order"])
        return decode_cells(table.column("indices"), table.column("values"), order, meta["values"])
    ind = table.column("indices").combine_chunks()
    val = table.column("values").combine_chunks()
    offsets = ind.offsets.to_numpy().astype(np.int64)
    start, stop = offsets[0], offsets[-1]
    return (
        offsets - start,
        delta_decode(ind.values.to_numpy(), offsets),
        val.values.to_numpy(zero_copy_only=False)[start:stop],
    )


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
