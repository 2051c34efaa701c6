"""scTab store layouts: the published dense parquet store, schce's compact CSR store, and the varint codec.

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
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

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


def cl_label_ids(names, onto, what: str, fix: str) -> list[str]:
    """The CL IDs of a store's (or checkpoint's) label names, in their order; two names of one term are an error.

    The order is the label codes', so it must stay one to one: ``what`` names the labels and ``fix`` the way out in
    the error.
    """
    mapping = onto.map_labels(names)
    ids = [mapping[n] for n in names]
    if len(set(ids)) != len(ids):
        raise ValueError(f"Several {what} map to the same CL term; {fix}")
    return ids


# ---------------------------------------------------------------------------------------------- hierarchy check
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
    """Inverse of :func:`encode_cells`: per-cell offsets, gene indices (int32) and values of the rows.

    One compiled pass (:class:`~schce.data.sctab._kernels.CodedCells`) where numba imports, else the numpy passes
    of :func:`decode_cells_numpy` (the reference).
    """
    from schce.data.sctab import _kernels

    if not _kernels.AVAILABLE:
        return decode_cells_numpy(indices, values, gene_order, coding)
    return coded_cells(indices, values, gene_order, coding).decode()


def coded_cells(indices: pa.ChunkedArray, values: pa.ChunkedArray, gene_order: np.ndarray, coding: str):
    """The cells of format-2 columns as stored, decoded row by row into batches (needs numba).

    A :class:`~schce.data.sctab._kernels.CodedCells` over the columns' bytes (not copied).
    """
    from schce.data.sctab import _kernels

    cell_bytes, code_bytes = _binary_parts(indices)
    value_cells, value_bytes = _binary_parts(values)
    return _kernels.CodedCells(cell_bytes, code_bytes, value_cells, value_bytes, gene_order, coding)


def decode_cells_numpy(
    indices: pa.ChunkedArray, values: pa.ChunkedArray, gene_order: np.ndarray, coding: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`decode_cells` in whole-array numpy passes (the reference of the compiled decoder)."""
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
        out[above_one] = rest + 2
    else:
        out = value_bytes.view(coding)
        if len(out) != len(genes):
            raise ValueError("A compact part's values do not match its indices; the store is damaged.")
    return offsets, genes, out


def delta_decode(gaps: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Gene indices of format-1 parts (each cell's first index, then the gaps) for ``offsets[0]:offsets[-1]``."""
    total = np.cumsum(gaps[offsets[0] : offsets[-1]], dtype=np.int64)
    before = np.concatenate([[0], total])[offsets[:-1] - offsets[0]]
    return total - np.repeat(before, np.diff(offsets))


def part_codec(pf: pq.ParquetFile) -> tuple[str, np.ndarray] | None:
    """The value coding and gene order of a format-2 compact part; ``None`` for format 1."""
    kv = pf.metadata.metadata or {}
    meta = json.loads(kv[_PART_META_KEY]) if _PART_META_KEY in kv else {}
    if meta.get("format_version", 1) < 2:
        return None
    return meta["values"], np.frombuffer(base64.b64decode(kv[_GENE_ORDER_KEY]), dtype=meta["gene_order"])


def read_compact_rows(
    table: pa.Table, codec: tuple[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-cell offsets (from 0), gene indices and values of the ``indices``/``values`` columns of a compact part.

    ``codec`` is the part's :func:`part_codec`. Reads both formats: 2 (binary columns, see :func:`encode_cells`) and
    1 (``list`` columns of delta-coded indices and plain values, as earlier versions wrote).
    """
    if codec is not None:
        coding, order = codec
        return decode_cells(table.column("indices"), table.column("values"), order, coding)
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


def label_usage(
    path: str | os.PathLike, source_column: str = "dataset_id", splits=("train", "val"), n_labels: int | None = None
) -> np.ndarray:
    """``used[source, label]``: which ``cell_type`` codes each ``source_column`` code annotates in ``splits``.

    One pass over the two code columns, a row group at a time: memory depends on the numbers of sources and labels,
    not of cells. Sources and labels are the codes of ``categorical_lookup`` (``n_labels`` overrides the label
    count, e.g. a model's).
    """
    if source_column not in CODE_COLUMNS:
        raise ValueError(
            f"source_column must be one of the store's code columns {CODE_COLUMNS}, got {source_column!r}."
        )
    n_sources = len(read_lookup(path, source_column))
    n_labels = len(read_lookup(path, "cell_type")) if n_labels is None else int(n_labels)
    used = np.zeros((n_sources, n_labels), dtype=bool)
    for split in splits:
        for part in split_parts(path, split):
            pf = pq.ParquetFile(part)
            missing = {"cell_type", source_column} - set(pf.schema_arrow.names)
            if missing:
                raise ValueError(f"{part} has no {sorted(missing)} column: the store cannot give per-source labels.")
            for g in range(pf.metadata.num_row_groups):
                table = pf.read_row_group(g, columns=["cell_type", source_column])
                labels = table.column("cell_type").to_numpy().astype(np.int64)
                sources = table.column(source_column).to_numpy().astype(np.int64)
                bad = (labels < 0) | (labels >= n_labels) | (sources < 0) | (sources >= n_sources)
                if bad.any():
                    raise ValueError(
                        f"{part} holds codes outside categorical_lookup ({int(bad.sum())} cells): cell_type must be "
                        f"in [0, {n_labels}) and {source_column} in [0, {n_sources})."
                    )
                used[sources, labels] = True
    return used
