"""Compiled (numba) CPU loops of the model's input: the CSR scatter and the MLP's in-place input dropout.

:class:`~schce.nn.Densifier` and :class:`~schce.nn._backbones.InputDropout` use them on the CPU.
Each is one pass over its data where torch or numpy make several (index arrays, boolean masks). numba is a
dependency of scanpy, so nothing new is installed; a kernel is compiled on first use and cached on disk. Without
numba each accessor returns ``None`` and the callers keep their torch / numpy forms, which are also what the tests
compare the kernels against.
"""

from __future__ import annotations

_KERNELS: dict = {}


def _scatter(indptr, indices, values, out):  # pragma: no cover - compiled
    n_genes, n_values = out.shape[1], len(values)
    for i in range(len(indptr) - 1):
        if indptr[i] < 0 or indptr[i + 1] > n_values:
            return False
        for j in range(indptr[i], indptr[i + 1]):
            g = indices[j]
            if g < 0 or g >= n_genes:
                return False
            out[i, g] = values[j]
    return True


def _dropout(x, draws, threshold, scale):  # pragma: no cover - compiled
    for i in range(len(x)):
        x[i] = x[i] * scale if draws[i] >= threshold else 0.0


def _compiled(loop):
    """``loop`` as a numba function (compiled once, at its first call, or loaded from the cache); None without numba."""
    name = loop.__name__
    if name not in _KERNELS:
        try:
            import numba
        except ImportError:  # pragma: no cover - numba comes with scanpy
            _KERNELS[name] = None
        else:
            _KERNELS[name] = numba.njit(cache=True, nogil=True, boundscheck=False)(loop)
    return _KERNELS[name]


def scatter():
    """``scatter(indptr, indices, values, out) -> bool``: ``out[i, indices[j]] = values[j]`` for row ``i``'s entries.

    Returns False (having written part of ``out``) when a gene index or ``indptr`` is out of range.
    """
    return _compiled(_scatter)


def dropout():
    """``dropout(x, draws, threshold, scale)``: in place, zero or scale every value of a flat ``x``.

    ``x[i] = 0`` where ``draws[i] < threshold``, else ``x[i] * scale`` (float32 arithmetic, as torch's
    ``masked_fill_`` then ``mul_``).
    """
    return _compiled(_dropout)
