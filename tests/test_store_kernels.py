"""The compiled loops of the compact store (decoding, gathering, scattering) against their numpy references."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from _private import decode_cells, decode_cells_numpy, encode_cells, store_kernels

pytestmark = pytest.mark.skipif(not store_kernels.AVAILABLE, reason="numba is not importable")

N_GENES = 700


def _cells(coding: str, seed: int = 0) -> np.ndarray:
    """Cells with empty rows, a full row, counts needing 1 to 5 varint bytes and ranks needing 2 bytes."""
    rng = np.random.default_rng(seed)
    x = (rng.random((60, N_GENES)) < 0.1) * rng.integers(1, 4, (60, N_GENES))
    x[0] = 0
    x[1] = np.arange(1, N_GENES + 1)
    x[2, [0, 5, N_GENES - 1]] = [2**14, 2**24, 2**31]
    x[3, N_GENES - 1] = 1  # a lone gene at the end: a two-byte gap
    x = x.astype(np.float32)
    if coding != "count":
        x = np.log1p(x) * 0.7
    return x


@pytest.mark.parametrize("coding", ["count", "float16", "float32"])
def test_compiled_decoder_matches_numpy_and_the_cells(coding):
    x = _cells(coding)
    rank = np.random.default_rng(1).permutation(N_GENES)
    order = np.argsort(rank).astype(np.uint16)  # the part's gene order: gene of each rank
    indices, values, nnz = encode_cells(x, rank, coding)
    ind, val = pa.chunked_array([indices]), pa.chunked_array([values])
    fast, ref = decode_cells(ind, val, order, coding), decode_cells_numpy(ind, val, order, coding)
    assert fast[1].dtype == np.int32 and fast[2].dtype == np.float32 and len(fast[1]) == nnz
    for a, b in zip(fast, ref, strict=True):
        np.testing.assert_array_equal(a, b.astype(a.dtype))
    offsets, genes, vals = fast
    back = np.zeros_like(x)
    rows = np.repeat(np.arange(len(x)), np.diff(offsets))
    back[rows, genes] = vals
    expect = x if coding != "float16" else x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(back, expect)


def test_compiled_decoder_rejects_damaged_parts():
    x = _cells("count")
    rank = np.arange(N_GENES)
    indices, values, _ = encode_cells(x, rank, "count")
    order = np.arange(N_GENES, dtype=np.uint16)
    ind = pa.chunked_array([indices])
    with pytest.raises(ValueError, match="values do not match"):
        decode_cells(ind, pa.chunked_array([values.slice(0, len(values) - 1)]), order, "count")
    with pytest.raises(ValueError, match="beyond its gene order"):
        decode_cells(ind, pa.chunked_array([values]), order[: N_GENES // 2], "count")
    # A cell whose last byte announces another one: the number runs past the cell's bytes into the next cell, and
    # the last cell's past the data.
    data = np.frombuffer(indices.buffers()[2], dtype=np.uint8).copy()
    data[-1] |= 128
    offsets = np.frombuffer(indices.buffers()[1], dtype=np.int32)[: len(indices) + 1]
    bad = pa.BinaryArray.from_buffers(pa.binary(), len(indices), [None, pa.py_buffer(offsets), pa.py_buffer(data)])
    with pytest.raises(ValueError, match="Truncated|damaged"):
        decode_cells(pa.chunked_array([bad]), pa.chunked_array([values]), order, "count")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])  # decoded, the probe's, format 1's counts
def test_gather_and_scatter_rows_match_fancy_indexing(dtype):
    rng = np.random.default_rng(2)
    x = np.minimum(_cells("count", seed=3), 60_000)
    offsets = np.concatenate([[0], np.cumsum((x != 0).sum(1))]).astype(np.int64)
    r, c = np.nonzero(x)
    indices, values = c.astype(np.uint16), x[r, c].astype(dtype)
    rows = rng.permutation(len(x))[:40]
    dest = rng.permutation(40)
    lens = np.zeros(40, dtype=np.int64)
    lens[dest] = np.diff(offsets)[rows]
    indptr = np.concatenate([[0], np.cumsum(lens)])
    out_i, out_v = np.full(indptr[-1], -1, np.int32), np.full(indptr[-1], np.nan, np.float32)
    store_kernels.gather_rows(offsets, indices, values, rows, dest, indptr, out_i, out_v)
    for j, row in zip(dest, rows, strict=True):
        lo, hi = offsets[row], offsets[row + 1]
        np.testing.assert_array_equal(out_i[indptr[j] : indptr[j + 1]], indices[lo:hi])
        np.testing.assert_array_equal(out_v[indptr[j] : indptr[j + 1]], values[lo:hi].astype(np.float32))
    out = np.zeros((40, N_GENES), dtype=np.float32)
    store_kernels.scatter_rows(offsets, indices, values, rows, dest, out)
    np.testing.assert_array_equal(out[dest], x[rows].astype(dtype).astype(np.float32))


def _coded(x: np.ndarray, coding: str, seed: int = 1):
    rank = np.random.default_rng(seed).permutation(N_GENES)
    order = np.argsort(rank).astype(np.uint16)
    indices, values, _ = encode_cells(x, rank, coding)
    ind, val = pa.chunked_array([indices]), pa.chunked_array([values])
    return ind, val, order


@pytest.mark.parametrize("coding", ["count", "float16", "float32"])
def test_coded_cells_decode_drawn_rows_straight_into_a_batch(coding):
    """Rows decoded where a batch wants them equal the numpy decoder's rows; the other batch entries are untouched."""
    x = _cells(coding, seed=4)
    ind, val, order = _coded(x, coding)
    offsets, genes, values = decode_cells_numpy(ind, val, order, coding)
    cells = store_kernels.CodedCells(*_parts(ind), *_parts(val), order, coding)
    np.testing.assert_array_equal(cells.lengths, np.diff(offsets))
    rng = np.random.default_rng(5)
    rows, dest = rng.permutation(len(x))[:25], rng.permutation(40)[:25]  # 15 batch rows belong to other blocks
    lens = np.zeros(40, dtype=np.int64)
    lens[dest] = cells.lengths[rows]
    indptr = np.concatenate([[0], np.cumsum(lens)])
    out_i, out_v = np.full(indptr[-1], -1, np.int32), np.full(indptr[-1], np.nan, np.float32)
    cells.write_csr(rows, dest, indptr, out_i, out_v)
    for j, row in zip(dest, rows, strict=True):
        lo, hi = offsets[row], offsets[row + 1]
        np.testing.assert_array_equal(out_i[indptr[j] : indptr[j + 1]], genes[lo:hi])
        np.testing.assert_array_equal(out_v[indptr[j] : indptr[j + 1]], values[lo:hi].astype(np.float32))
    assert np.isnan(out_v[lens.sum() :]).all()  # nothing written past the rows (all batch rows are accounted for)
    other = np.setdiff1d(np.arange(40), dest)
    for j in other:
        assert (out_i[indptr[j] : indptr[j + 1]] == -1).all()
    # decode(rows) is the same rows as a CSR of their own.
    sub_offsets, sub_genes, sub_values = cells.decode(rows)
    np.testing.assert_array_equal(np.diff(sub_offsets), cells.lengths[rows])
    np.testing.assert_array_equal(sub_genes, np.concatenate([genes[offsets[r] : offsets[r + 1]] for r in rows]))
    np.testing.assert_array_equal(sub_values, np.concatenate([values[offsets[r] : offsets[r + 1]] for r in rows]))


def _parts(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks()
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[: len(arr) + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    return offsets, data[: offsets[-1]]


def test_coded_cells_with_only_counts_of_one_and_empty_cells():
    """No value bytes at all (every count is 1), and cells without genes."""
    x = (np.random.default_rng(6).random((30, N_GENES)) < 0.05).astype(np.float32)
    x[[0, 7, 29]] = 0
    ind, val, order = _coded(x, "count")
    cells = store_kernels.CodedCells(*_parts(ind), *_parts(val), order, "count")
    offsets, genes, values = cells.decode()
    back = np.zeros_like(x)
    back[np.repeat(np.arange(len(x)), np.diff(offsets)), genes] = values
    np.testing.assert_array_equal(back, x)


def test_coded_cells_name_the_damage_of_a_cell():
    x = _cells("count", seed=7)
    ind, val, order = _coded(x, "count")
    (cell_bytes, code_bytes), (value_cells, value_bytes) = _parts(ind), _parts(val)
    # A cell that takes one value byte of its neighbour: its own count of values no longer matches.
    shifted = value_cells.copy()
    k = int(np.flatnonzero(np.diff(value_cells) > 0)[0])
    shifted[k + 1] -= 1
    cells = store_kernels.CodedCells(cell_bytes, code_bytes, shifted, value_bytes, order, "count")
    with pytest.raises(ValueError, match="values do not match"):
        cells.decode(np.array([k]))
    cells.decode(np.array([k + 2]))  # the other cells still decode
    # A cell whose last byte announces another one: that number has no final byte within the cell.
    truncated = code_bytes.copy()
    k = int(np.flatnonzero(np.diff(cell_bytes) > 0)[3])
    truncated[cell_bytes[k + 1] - 1] |= 128
    cells = store_kernels.CodedCells(cell_bytes, truncated, value_cells, value_bytes, order, "count")
    with pytest.raises(ValueError, match="Truncated"):
        cells.decode(np.array([k]))
    # float values whose bytes do not hold one value per gene.
    ind, val, order = _coded(_cells("float16"), "float16")
    (cell_bytes, code_bytes), (value_cells, value_bytes) = _parts(ind), _parts(val)
    with pytest.raises(ValueError, match="values do not match"):
        store_kernels.CodedCells(cell_bytes, code_bytes, value_cells[:-1], value_bytes, order, "float16")
    bad = value_cells.copy()
    bad[1:] += 2
    with pytest.raises(ValueError, match="values do not match"):
        store_kernels.CodedCells(cell_bytes, code_bytes, bad, np.append(value_bytes, [0, 0]), order, "float16")


@pytest.mark.parametrize("coding", ["count", "float32"])
def test_coded_cells_reject_a_gap_so_large_the_rank_would_wrap_around(coding):
    """A ten-byte gap of 2**64 - 1 added to a rank would wrap around to a small, valid-looking rank."""
    huge = np.array([255] * 9 + [1], dtype=np.uint8)  # LEB128 of 2**64 - 1
    cell_bytes, code_bytes = np.array([0, 11]), np.concatenate([[0], huge]).astype(np.uint8)
    if coding == "count":  # both numbers have the low bit (count > 1) set for the first, none for the huge one
        code_bytes[0] = 1
        value_cells, value_bytes = np.array([0, 1]), np.array([0], dtype=np.uint8)
    else:
        value_cells, value_bytes = np.array([0, 8]), np.zeros(8, dtype=np.uint8)
    cells = store_kernels.CodedCells(cell_bytes, code_bytes, value_cells, value_bytes, np.arange(N_GENES), coding)
    assert len(cells) == 1 and cells.lengths[0] == 2
    with pytest.raises(ValueError, match="beyond its gene order"):
        cells.decode()


def test_coded_cells_refuse_offsets_outside_their_bytes():
    """The loops read without bounds checks, so offsets past the data or running backwards are refused up front."""
    ind, val, order = _coded(_cells("count", seed=8), "count")
    (cell_bytes, code_bytes), (value_cells, value_bytes) = _parts(ind), _parts(val)
    with pytest.raises(ValueError, match="Truncated"):
        store_kernels.CodedCells(cell_bytes, code_bytes[:-1], value_cells, value_bytes, order, "count")
    backwards = value_cells.copy()
    backwards[5] = backwards[6] + 1
    for bad in (backwards, value_cells + 1):
        with pytest.raises(ValueError, match="values do not match"):
            store_kernels.CodedCells(cell_bytes, code_bytes, bad, value_bytes, order, "count")
    cells = store_kernels.CodedCells(cell_bytes, code_bytes, value_cells, value_bytes, order, "count")
    assert len(cells.value_bytes) == len(value_bytes) + cells.lengths.max() + 1  # the zeros the decoder may read
    np.testing.assert_array_equal(cells.value_bytes[: len(value_bytes)], value_bytes)
