"""Reading expression matrices row-wise and checking their values."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

logger = logging.getLogger(__name__)

CHUNK_ROWS = 8192


def get_matrix(adata: AnnData, layer: str | None):
    """The expression matrix in ``adata.X`` or ``adata.layers[layer]``, with a clear error for a wrong layer."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty (None). Pass layer= naming the layer that holds the expression.")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} is not in adata.layers (available: {sorted(adata.layers.keys()) or 'none'}). "
            "Pass layer=None to use adata.X."
        )
    return adata.layers[layer]


def read_rows(X, rows: np.ndarray) -> np.ndarray:
    """Dense float32 rows of an in-memory or backed matrix; ``rows`` in any order."""
    rows = np.asarray(rows)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    # Backed (h5) matrices need increasing indices; read sorted then restore the requested order.
    block = X[sorted_rows]
    if sp.issparse(block):
        block = block.toarray()
    block = np.asarray(block, dtype=np.float32)
    out = np.empty_like(block)
    out[order] = block
    return out


def iter_row_chunks(X, n_rows: int, chunk: int = CHUNK_ROWS):
    """Yield ``(start, stop, block)`` with ``block`` sparse or dense as stored (no densifying)."""
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        yield start, stop, X[start:stop]


def empty_rows(X, n_rows: int, columns: np.ndarray) -> np.ndarray:
    """Rows with no non-zero value in ``columns`` (e.g. the query columns of the model's genes), in row chunks."""
    out = np.zeros(n_rows, dtype=bool)
    columns = np.asarray(columns, dtype=np.int64)
    for start, stop, block in iter_row_chunks(X, n_rows):
        if sp.issparse(block):
            sub = sp.csr_matrix(block)[:, columns]
            out[start:stop] = np.asarray((sub != 0).sum(axis=1)).ravel() == 0
        else:
            out[start:stop] = ~(np.asarray(block)[:, columns] != 0).any(axis=1)
    return out


@dataclass(frozen=True)
class ExpressionSummary:
    """What :func:`check_expression` found."""

    is_integer: bool
    max_value: float

    @property
    def looks_like_counts(self) -> bool:
        """Non-negative integers: raw counts, which schce normalises itself."""
        return self.is_integer


def check_expression(X, n_rows: int, where: str = "adata.X") -> ExpressionSummary:
    """Check expression values and tell counts from already-normalised data.

    One pass over the matrix in row chunks (works for backed data).

    Parameters
    ----------
    X
        Dense, sparse or backed matrix.
    n_rows
        Number of rows.
    where
        How to name the matrix in errors.

    Raises
    ------
    ValueError
        On NaN, infinite or negative values, naming how many and the fix.
    """
    is_integer, max_value = True, 0.0
    n_nan = n_inf = n_neg = 0
    for _, _, block in iter_row_chunks(X, n_rows):
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if values.size == 0:
            continue
        finite = np.isfinite(values)
        n_nan += int(np.isnan(values).sum())
        n_inf += int((~finite).sum()) - int(np.isnan(values).sum())
        fv = values[finite]
        n_neg += int((fv < 0).sum())
        if fv.size:
            max_value = max(max_value, float(fv.max()))
            if is_integer and not np.array_equal(fv, np.round(fv)):
                is_integer = False
    problems = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite"), (n_neg, "negative")) if n]
    if problems:
        raise ValueError(
            f"{where} contains {', '.join(problems)} value(s). schce needs non-negative finite expression: raw counts "
            "(preferred) or log-normalised values. Fix or remove those entries, or pass layer= naming a clean layer."
        )
    return ExpressionSummary(is_integer=is_integer, max_value=max_value)


def resolve_normalize(normalize: bool | str, summary: ExpressionSummary, where: str) -> bool:
    """Decide whether to normalise: ``"auto"`` normalises raw counts and leaves non-integer data as it is."""
    if normalize == "auto":
        decision = summary.looks_like_counts
        logger.info(
            "%s looks like %s; %s.",
            where,
            "raw counts" if decision else "normalised values (non-integer)",
            "schce will size-factor normalise and log1p it" if decision else "it is used as it is",
        )
        return decision
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be 'auto', True or False, got {normalize!r}.")
    if normalize and not summary.looks_like_counts:
        logger.warning("%s has non-integer values but normalize=True: it will be normalised as if counts.", where)
    return normalize
