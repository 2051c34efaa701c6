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


# Relative spread of per-cell totals below which the totals count as constant (a normalised matrix).
CONSTANT_TOTALS = 1e-2
# log1p of normalised counts stays below this (log1p(1e6) ≈ 13.8); larger non-integer values are not log-scaled.
LOG_MAX = 30.0
KINDS = {
    "counts": "raw counts (non-negative integers)",
    "normalized": "normalised counts without log (non-integer, constant per-cell totals: CP10k / CPM-like)",
    "log1p": "log1p-normalised values (non-integer, constant per-cell totals of expm1)",
    "scaled counts": "non-integer values above the log range with varying per-cell totals (e.g. counts × a factor)",
    "log-like": "non-integer values in the log range whose expm1 totals vary (log data on a gene subset, or another "
    "transform)",
}


@dataclass(frozen=True)
class ExpressionSummary:
    """What :func:`check_expression` found."""

    is_integer: bool
    max_value: float
    totals_spread: float = float("nan")
    expm1_totals_spread: float = float("nan")

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`: what the values look like."""
        if self.is_integer:
            return "counts"
        if self.totals_spread < CONSTANT_TOTALS:
            return "normalized"
        if self.expm1_totals_spread < CONSTANT_TOTALS:
            return "log1p"
        return "scaled counts" if self.max_value > LOG_MAX else "log-like"

    @property
    def looks_like_counts(self) -> bool:
        """Values that size-factor normalisation turns into log-normalised input as it does raw counts."""
        return self.kind in ("counts", "normalized", "scaled counts")


def _spread(totals: np.ndarray) -> float:
    """Relative spread ``(max - min) / median`` of the non-zero per-cell totals."""
    totals = totals[totals > 0]
    if totals.size < 2:
        return float("nan")
    return float((totals.max() - totals.min()) / np.median(totals))


def _row_totals(block) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sums of ``block`` and of ``expm1(block)`` (zeros stay zeros, so sparse blocks stay sparse)."""
    if sp.issparse(block):
        block = sp.csr_matrix(block, dtype=np.float64)
        totals = np.asarray(block.sum(axis=1)).ravel()
        block.data = np.expm1(np.clip(block.data, None, 700))
        return totals, np.asarray(block.sum(axis=1)).ravel()
    block = np.asarray(block, dtype=np.float64)
    return block.sum(axis=1), np.expm1(np.clip(block, None, 700)).sum(axis=1)


def check_expression(X, n_rows: int, where: str = "adata.X") -> ExpressionSummary:
    """Check expression values and tell raw counts, normalised, log-normalised and scaled data apart.

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
        On NaN, infinite or negative values (scaled / centred data), naming how many and the fix.
    """
    is_integer, max_value, min_value = True, 0.0, 0.0
    n_nan = n_inf = n_neg = 0
    totals, expm1_totals = [], []
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
            min_value = min(min_value, float(fv.min()))
            if is_integer and not np.array_equal(fv, np.round(fv)):
                is_integer = False
        if not n_nan and not n_inf and not n_neg:  # per-cell totals tell normalised from log-normalised data
            t, e = _row_totals(block)
            totals.append(t)
            expm1_totals.append(e)
    problems = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "infinite"), (n_neg, "negative")) if n]
    if problems:
        scaled = (
            f" Negative values (minimum {min_value:.3g}) mean the data were scaled or centred (e.g. sc.pp.scale, "
            "z-scores), which loses what schce needs."
            if n_neg
            else ""
        )
        raise ValueError(
            f"{where} contains {', '.join(problems)} value(s).{scaled} schce needs non-negative finite expression: "
            "raw counts (preferred) or log-normalised values. Fix or remove those entries, or pass layer= naming a "
            "clean layer (e.g. the counts)."
        )
    if is_integer:
        return ExpressionSummary(is_integer=True, max_value=max_value)
    return ExpressionSummary(
        is_integer=False,
        max_value=max_value,
        totals_spread=_spread(np.concatenate(totals)) if totals else float("nan"),
        expm1_totals_spread=_spread(np.concatenate(expm1_totals)) if expm1_totals else float("nan"),
    )


def _auto_normalize(summary: ExpressionSummary, where: str, setup: dict | None) -> bool:
    """The ``normalize="auto"`` decision for data of ``summary.kind``, logged with what was seen."""
    kind = summary.kind
    seen = f"{where} looks like {KINDS[kind]}; max {summary.max_value:.4g}"
    trained_kind = (setup or {}).get("expression")
    if setup is not None and not setup.get("normalize") and trained_kind in ("counts", "normalized", "scaled counts"):
        # The model learnt from such values as they were: give it the same preprocessing.
        if kind != trained_kind:
            logger.warning(
                "%s. The model was trained on %s used as given (normalize=False), so these are used as given too; "
                "pass data of that kind for reliable predictions.",
                seen,
                KINDS[trained_kind],
            )
        else:
            logger.info("%s; used as given, as the model was trained (normalize=False).", seen)
        return False
    if kind == "counts":
        logger.info("%s; schce will size-factor normalise and log1p it.", seen)
    elif kind == "log1p":
        logger.info("%s; it is used as it is.", seen)
    elif kind == "log-like":
        logger.warning("%s; assumed log-normalised and used as it is (pass normalize=True if it is not).", seen)
    else:
        logger.warning(
            "%s; schce normalises it as counts (per-cell size-factor normalisation does not depend on a cell's "
            "scale), then log1p. Pass normalize=False to use it as it is.",
            seen,
        )
    return summary.looks_like_counts


def resolve_normalize(normalize: bool | str, summary: ExpressionSummary, where: str, setup: dict | None = None) -> bool:
    """Decide whether to normalise.

    ``"auto"`` normalises raw counts and count-like data (normalised without log, or counts times a factor), and
    leaves log-normalised data as it is. With ``setup`` (a trained model's registry section), data are prepared as
    the model's training data were: a model trained on counts with ``normalize=False`` gets counts as given.
    """
    if normalize == "auto":
        return _auto_normalize(summary, where, setup)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be 'auto', True or False, got {normalize!r}.")
    if normalize and summary.kind in ("log1p", "log-like"):
        logger.warning(
            "%s looks like %s but normalize=True: it will be normalised as if counts.", where, KINDS[summary.kind]
        )
    return normalize
