"""Compiled (numba) loops of the compact store: row groups' cells decoded straight into batches, rows gathered.

A format-2 row group is kept as it is stored (:class:`CodedCells`: each cell's byte strings, the part's gene order)
and each row is decoded only when a batch draws it, straight into the batch's CSR arrays: no decoded copy of the
row group is written and then copied again. The numpy forms (:func:`~schce.data.sctab._format.decode_cells_numpy`,
the fancy indexing of ``_Block``) make several whole-array passes and temporaries per row group; each loop here
makes one pass and writes straight into its output. numba is a dependency of scanpy, so nothing new is installed;
it is imported, and the loops compiled, on first use, and they are cached on disk (``cache=True``), so DataLoader
workers and later processes load them instead of compiling again. The numpy forms stay the reference (the tests
compare both) and are used when numba cannot be imported.
"""

from __future__ import annotations

import importlib.util

import numpy as np

#: Whether numba can be imported (it is imported, and the loops compiled, on first use).
HAS_NUMBA = importlib.util.find_spec("numba") is not None
#: Whether the readers use the compiled loops (the benchmark switches them off to time the numpy passes).
AVAILABLE = HAS_NUMBA
_COMPILED = False

# Error codes of the decoder (0: fine).
_TRUNCATED, _RANK, _VALUES = 1, 2, 3
_ERRORS = {
    _TRUNCATED: "Truncated varint data in a compact part: a cell ends inside a number; the store is damaged.",
    _RANK: "A compact part codes a gene beyond its gene order; the store is damaged.",
    _VALUES: "A compact part's values do not match its indices; the store is damaged.",
}
#: float32 value of every float16 bit pattern: float16 values are decoded by one table look-up (numba has no float16).
_HALF = None


def _compile() -> None:
    """Turn the loops below into numba functions (once; compiled at their first call, or loaded from the cache).

    The module names are rebound, so ``_decode_rows`` finds the compiled ``_varint`` when it compiles.
    """
    global _varint, _lengths, _decode_rows, _copy_values, _gather, _scatter, _COMPILED
    if _COMPILED:
        return
    import numba

    jit = numba.njit(cache=True, nogil=True, boundscheck=False)
    _varint, _lengths, _decode_rows = jit(_varint), jit(_lengths), jit(_decode_rows)
    _copy_values, _gather, _scatter = jit(_copy_values), jit(_gather), jit(_scatter)
    _COMPILED = True


# The loops index with unsigned integers: numba wraps a negative signed index around (a compare and a select at
# every access), which doubled the time of these loops; unsigned indices cannot be negative, so it has nothing to do.
_ONE = np.uint64(1)
#: A count coded in one value byte, by ``(low bit of the gene's code) << 8 | byte``: 1 without the bit, else 2 + byte.
_SMALL = np.concatenate([np.ones(256), np.arange(256) + 2]).astype(np.float32)


def _varint(data, pos, end):  # pragma: no cover - compiled
    """The LEB128 number at ``data[pos]``, the position after it, and whether it ended before ``end``."""
    x, shift = np.uint64(0), np.uint64(0)
    while pos < end:
        b = np.uint64(data[pos])
        pos += _ONE
        x |= (b & np.uint64(127)) << shift
        shift += np.uint64(7)
        if b < np.uint64(128):
            return x, pos, True
    return x, pos, False


def _lengths(cell_bytes, code_bytes, out):  # pragma: no cover - compiled
    """Numbers (non-zero genes) of each cell: its bytes below 128, as every number ends with one."""
    for c in range(len(cell_bytes) - 1):
        n = 0
        for p in range(np.uint64(cell_bytes[c]), np.uint64(cell_bytes[c + 1])):
            n += code_bytes[p] < 128
        out[c] = n


def _decode_rows(
    cell_bytes, code_bytes, value_cells, value_bytes, order, counts, small, rows, dest, indptr, genes, values
):  # pragma: no cover - compiled
    """Decode cells ``rows`` into rows ``dest`` of a CSR batch (``indptr`` set); returns an error code.

    ``genes`` get the gene of each coded rank; with ``counts`` also ``values`` (1, or 2 + the cell's next varint of
    ``value_bytes`` when the code's low bit is set), the one-byte cases looked up in ``small`` (:data:`_SMALL`).
    A row of ``indptr`` holds as many entries as the cell has final bytes (:func:`_lengths`), so the loop runs that
    many numbers and never reads past the cell. The value byte is read without a branch on the low bit (set about as
    often as not on UMI counts, so a branch would be mispredicted) and without a bounds check: ``value_bytes`` ends
    with zeros as long as the longest cell (:class:`CodedCells`); every cell must use exactly its own value bytes.
    Ranks only grow, so the last one is checked against the gene order after the cell (gene reads are clamped
    meanwhile).
    """
    n_order = np.uint64(len(order))
    shift = _ONE if counts else np.uint64(0)
    for j in range(len(rows)):
        r, d = np.uint64(rows[j]), np.uint64(dest[j])
        pos, end = np.uint64(cell_bytes[r]), np.uint64(cell_bytes[r + _ONE])
        vpos, vend = np.uint64(value_cells[r]), np.uint64(value_cells[r + _ONE])
        k, stop = np.uint64(indptr[d]), np.uint64(indptr[d + _ONE])
        rank = np.uint64(0)  # the rank of the next number, given a gap of 0
        while k < stop:
            code = np.uint64(code_bytes[pos])
            pos += _ONE
            if code >= np.uint64(128):  # rare: nearly every gap fits one byte
                code, pos, ok = _varint(code_bytes, pos - _ONE, end)
                if not ok:
                    return 1
                if code >> shift >= n_order:  # so that the rank cannot wrap around
                    return 2
            rank += code >> shift
            if counts:
                more = code & _ONE
                v = np.uint64(value_bytes[vpos])  # in range: CodedCells pads the bytes
                if more & (v >> np.uint64(7)):  # rare: a count above 129
                    v, vpos, ok = _varint(value_bytes, vpos, vend)
                    if not ok:
                        return 3
                    vpos -= _ONE
                    values[k] = np.int64(v + np.uint64(2))
                else:
                    values[k] = small[(more << np.uint64(8)) | v]
                vpos += more
            genes[k] = order[min(rank, n_order - _ONE)]
            rank += _ONE
            k += _ONE
        if rank > n_order:
            return 2
        if pos != end:  # bytes after the cell's last number: it ends inside one
            return 1
        if counts and vpos != vend:
            return 3
    return 0


def _copy_values(starts, src, table, rows, dest, indptr, values):  # pragma: no cover - compiled
    """Stored float values of cells ``rows`` (from entry ``starts[r]``) into rows ``dest`` of a CSR batch.

    float16 values come as their bit patterns and are looked up in ``table`` (an entry per pattern); float32 values
    come as they are, with an empty ``table``.
    """
    for j in range(len(rows)):
        d = np.uint64(dest[j])
        s, o, e = np.uint64(starts[np.uint64(rows[j])]), np.uint64(indptr[d]), np.uint64(indptr[d + _ONE])
        if len(table):
            for i in range(e - o):
                values[o + i] = table[np.uint64(src[s + i])]
        else:
            for i in range(e - o):
                values[o + i] = src[s + i]


def _gather(src_offsets, src_indices, src_values, rows, dest, indptr, indices, values):  # pragma: no cover
    for j in range(len(rows)):
        r, d = np.uint64(rows[j]), np.uint64(dest[j])
        s, e = np.uint64(src_offsets[r]), np.uint64(src_offsets[r + _ONE])
        o = np.uint64(indptr[d])
        for i in range(e - s):
            indices[o + i] = src_indices[s + i]
            values[o + i] = src_values[s + i]


def _scatter(src_offsets, src_indices, src_values, rows, dest, out):  # pragma: no cover - compiled
    for j in range(len(rows)):
        r, d = np.uint64(rows[j]), np.uint64(dest[j])
        for i in range(np.uint64(src_offsets[r]), np.uint64(src_offsets[r + _ONE])):
            out[d, np.uint64(src_indices[i])] = src_values[i]


def _offsets_within(offsets: np.ndarray, n: int) -> bool:
    """Whether ``offsets`` start at or after 0, never decrease and end within ``n`` bytes."""
    return len(offsets) > 0 and offsets[0] >= 0 and offsets[-1] <= n and bool(np.all(offsets[1:] >= offsets[:-1]))


def _half_table() -> np.ndarray:
    global _HALF
    if _HALF is None:
        _HALF = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    return _HALF


class CodedCells:
    """One format-2 row group as stored, decoded row by row straight into the batches that draw its rows.

    Parameters are the parts of :func:`~schce.data.sctab._format.encode_cells`' columns: per-cell byte offsets (from
    0) and bytes of ``indices`` and ``values``, the part's gene order (gene of each rank) and the value coding. The
    per-cell numbers of genes are counted once here (one pass over the bytes); the rest is checked as rows decode.
    """

    def __init__(self, cell_bytes, code_bytes, value_cells, value_bytes, order, coding: str):
        _compile()
        cell_bytes, value_cells = cell_bytes.astype(np.int64, copy=False), value_cells.astype(np.int64, copy=False)
        # The loops read without bounds checks: every cell's bytes must lie within the data.
        if not _offsets_within(cell_bytes, len(code_bytes)):
            raise ValueError(_ERRORS[_TRUNCATED])
        if len(value_cells) != len(cell_bytes) or not _offsets_within(value_cells, len(value_bytes)):
            raise ValueError(_ERRORS[_VALUES])
        self.cell_bytes, self.code_bytes = cell_bytes, code_bytes
        self.order, self.counts = order.astype(np.int32, copy=False), coding == "count"
        self.lengths = np.empty(len(cell_bytes) - 1, dtype=np.int64)
        _lengths(self.cell_bytes, code_bytes, self.lengths)
        if self.counts:
            # The decoder reads a cell's next value byte before it knows whether the cell has one, without a bounds
            # check: a cell reads at most one byte per number past its start, so zeros as long as the longest cell
            # keep every read (a damaged cell's too) inside the array.
            pad = np.zeros(int(self.lengths.max(initial=0)) + 1, dtype=np.uint8)
            self.value_cells, self.value_bytes = value_cells, np.concatenate([value_bytes, pad])
            return
        size = np.dtype(coding).itemsize
        if len(value_bytes) % size or not np.array_equal(np.diff(value_cells), self.lengths * size):
            raise ValueError(_ERRORS[_VALUES])
        self.value_cells = value_cells // size
        if value_bytes.ctypes.data % size:  # a view needs aligned bytes
            value_bytes = value_bytes.copy()
        # Bit patterns: float16 is decoded by table look-up, float32 copied as it is.
        self.value_bytes = value_bytes.view(np.uint16 if size == 2 else np.uint32)

    def __len__(self) -> int:
        return len(self.lengths)

    def write_csr(self, rows: np.ndarray, dest: np.ndarray, indptr: np.ndarray, indices, values) -> None:
        """Decode cells ``rows`` into rows ``dest`` of a CSR batch whose ``indptr`` holds their :attr:`lengths`."""
        rows, dest = rows.astype(np.int64, copy=False), dest.astype(np.int64, copy=False)
        args = (self.cell_bytes, self.code_bytes, self.value_cells, self.value_bytes, self.order, self.counts, _SMALL)
        err = _decode_rows(*args, rows, dest, indptr, indices, values)
        if err:
            raise ValueError(_ERRORS[err])
        if self.counts:
            return
        table = _half_table() if self.value_bytes.dtype == np.uint16 else np.zeros(0, np.float32)
        # float32 bits are copied as uint32, so that the table look-up compiles for both (it indexes with src).
        out = values if len(table) else values.view(np.uint32)
        _copy_values(self.value_cells, self.value_bytes, table, rows, dest, indptr, out)

    def decode(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR offsets (int64), gene indices (int32) and values (float32) of cells ``rows`` (default: all)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(self.lengths[rows], out=offsets[1:])
        genes, values = np.empty(offsets[-1], dtype=np.int32), np.empty(offsets[-1], dtype=np.float32)
        self.write_csr(rows, np.arange(len(rows)), offsets, genes, values)
        return offsets, genes, values


def decode_cells_compiled(cell_bytes, code_bytes, value_cells, value_bytes, order, coding):
    """Per-cell offsets (int64), gene indices (int32) and values (float32) of format 2, in one compiled pass."""
    return CodedCells(cell_bytes, code_bytes, value_cells, value_bytes, order, coding).decode()


def _numba_values(values: np.ndarray) -> np.ndarray:
    # numba has no float16: such blocks are widened first (the decoder yields float32 already).
    return values.astype(np.float32) if values.dtype == np.float16 else values


def gather_rows(src_offsets, src_indices, src_values, rows, dest, indptr, indices, values) -> None:
    """Copy CSR rows ``rows`` of a block into rows ``dest`` of a CSR batch whose ``indptr`` is already set."""
    _compile()
    src_values = _numba_values(src_values)
    _gather(src_offsets, src_indices, src_values, rows.astype(np.int64), dest.astype(np.int64), indptr, indices, values)


def scatter_rows(src_offsets, src_indices, src_values, rows, dest, out: np.ndarray) -> None:
    """``out[dest] = X[rows]`` for a CSR block ``X``, writing only the stored entries (``out`` rows start at zero)."""
    _compile()
    src_values = _numba_values(src_values)
    _scatter(src_offsets, src_indices, src_values, rows.astype(np.int64), dest.astype(np.int64), out)
