"""Compiled (numba) loops of the compact store: decoding a row group and gathering or scattering rows of a block.

The numpy forms (:func:`~schce.data.sctab._format.decode_cells`, the fancy indexing of ``_Block``) make several
whole-array passes and temporaries per row group (varint continuation masks, running sums, position arrays of
every batch entry); each loop here makes one pass and writes straight into its output. numba is a dependency of
scanpy, so nothing new is installed; it is imported, and the kernels compiled, on first use, and they are cached on
disk (``cache=True``), so DataLoader workers and later processes load them instead of compiling again. The numpy
forms (:func:`~schce.data.sctab._format.decode_cells_numpy`) stay the reference (the tests compare both) and are
used when numba cannot be imported.
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
    _TRUNCATED: "Truncated varint data in a compact part: the last number has no final byte; the store is damaged.",
    _RANK: "A compact part codes a gene beyond its gene order; the store is damaged.",
    _VALUES: "A compact part's values do not match its indices; the store is damaged.",
}


def _compile() -> None:
    """Turn the loops below into numba functions (once; compiled at their first call, or loaded from the cache).

    The module names are rebound, so ``_decode`` finds the compiled ``_varint`` when it compiles.
    """
    global _varint, _decode, _gather, _scatter, _COMPILED
    if _COMPILED:
        return
    import numba

    jit = numba.njit(cache=True, nogil=True, boundscheck=False)
    _varint, _decode, _gather, _scatter = jit(_varint), jit(_decode), jit(_gather), jit(_scatter)
    _COMPILED = True


def _varint(data, pos, n):  # pragma: no cover - compiled
    """The LEB128 number at ``data[pos]`` and the position after it (``-1``: truncated)."""
    x, shift = 0, 0
    while pos < n:
        b = data[pos]
        pos += 1
        x |= np.int64(b & 127) << shift
        shift += 7
        if b < 128:
            return x, pos
    return x, -1


def _decode(cell_bytes, code_bytes, value_bytes, order, counts, offsets, genes, values):  # pragma: no cover - compiled
    """Decode format-2 cells into ``offsets``, ``genes`` (and ``values`` when ``counts``); returns an error code."""
    n_codes, n_order, n_values = len(code_bytes), len(order), len(value_bytes)
    k, vpos = 0, 0
    offsets[0] = 0
    for c in range(len(cell_bytes) - 1):
        pos, end = cell_bytes[c], cell_bytes[c + 1]
        rank = -1
        while pos < end:
            code = np.int64(code_bytes[pos])
            if code < 128:  # nearly every gap fits one byte
                pos += 1
            else:
                code, pos = _varint(code_bytes, pos, n_codes)
                if pos < 0:
                    return 1
            if counts:
                rank += (code >> 1) + 1
                more = code & 1
                # Counts above one take their bytes from ``values``, mostly one each: no branch on ``more`` there.
                v = np.int64(value_bytes[min(vpos, n_values - 1)]) if n_values else np.int64(0)
                if more and v >= 128:
                    v, vpos = _varint(value_bytes, vpos, n_values)
                    if vpos < 0:
                        return 3
                    vpos -= 1
                elif more and vpos >= n_values:
                    return 3
                vpos += more
                values[k] = 1 + more * (v + 1)
            else:
                rank += code + 1
            if rank >= n_order:
                return 2
            genes[k] = order[rank]
            k += 1
        offsets[c + 1] = k
    if counts and vpos != n_values:
        return 3
    return 0


def decode_cells_compiled(cell_bytes, code_bytes, value_bytes, order, coding):
    """Per-cell offsets (int64), gene indices (int32) and values (float32, or the stored float type) of format 2."""
    _compile()
    counts = coding == "count"
    # Every number ends with one byte below 128: that many entries.
    nnz = int(np.count_nonzero(code_bytes < 128))
    offsets = np.empty(len(cell_bytes), dtype=np.int64)
    genes = np.empty(nnz, dtype=np.int32)
    values = np.empty(nnz if counts else 0, dtype=np.float32)
    order = order.astype(np.int32)
    err = _decode(cell_bytes.astype(np.int64), code_bytes, value_bytes, order, counts, offsets, genes, values)
    if err:
        raise ValueError(_ERRORS[err])
    if not counts:
        values = value_bytes.view(coding).astype(np.float32)
        if len(values) != nnz:
            raise ValueError(_ERRORS[_VALUES])
    return offsets, genes, values


def _gather(src_offsets, src_indices, src_values, rows, dest, indptr, indices, values):  # pragma: no cover
    for j in range(len(rows)):
        r = rows[j]
        s, e = src_offsets[r], src_offsets[r + 1]
        o = indptr[dest[j]]
        for i in range(e - s):
            indices[o + i] = src_indices[s + i]
            values[o + i] = src_values[s + i]


def _scatter(src_offsets, src_indices, src_values, rows, dest, out):  # pragma: no cover - compiled
    for j in range(len(rows)):
        r, d = rows[j], dest[j]
        for i in range(src_offsets[r], src_offsets[r + 1]):
            out[d, src_indices[i]] = src_values[i]


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
