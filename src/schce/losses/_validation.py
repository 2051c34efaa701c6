"""Argument checks shared by the auxiliary single-cell losses: each names the argument and the shape expected."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Tolerance on the row sums of soft assignments; loose enough for float32 softmax outputs over many clusters.
_ROW_SUM_ATOL = 1e-4
# cdist's matrix-multiplication path computes |x|^2 + |y|^2 - 2 x.y, which loses precision through cancellation
# and can give small non-zero distances between identical points; the direct path is exact and still O(N^2) memory.
_CDIST_MODE = "donot_use_mm_for_euclid_dist"


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------------


def _check_float(name: str, x: Tensor, ndim: int, expected: str) -> None:
    if not isinstance(x, Tensor) or x.ndim != ndim or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating tensor of shape {expected}, got {got}")


def _check_same_shape(name: str, x: Tensor, ref_name: str, ref: Tensor) -> None:
    if not isinstance(x, Tensor) or x.shape != ref.shape:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must have the shape of {ref_name}, {tuple(ref.shape)}, got {got}")


def _check_labels(name: str, labels: Tensor, n: int, n_classes: int) -> Tensor:
    if not isinstance(labels, Tensor) or labels.dtype != torch.long or tuple(labels.shape) != (n,):
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"{name} must be a torch.long tensor of shape (N,) = ({n},), got {got}")
    if n > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_classes:
            raise ValueError(f"{name} must lie in [0, {n_classes}), got values in [{lo}, {hi}]")
    return labels


def _check_assignments(assignments: Tensor, n: int | None = None) -> None:
    _check_float("assignments", assignments, 2, "(N, K)" if n is None else f"(N, K) = ({n}, K)")
    if n is not None and assignments.shape[0] != n:
        raise ValueError(f"assignments must have shape (N, K) = ({n}, K), got {tuple(assignments.shape)}")
    if assignments.shape[0] == 0 or assignments.shape[1] == 0:
        raise ValueError(f"assignments must have shape (N, K) with N >= 1 and K >= 1, got {tuple(assignments.shape)}")
    a = assignments.detach()
    row_sums = a.sum(dim=1)
    if bool((a < 0).any()) or not bool(((row_sums - 1).abs() <= _ROW_SUM_ATOL).all()):
        raise ValueError(
            "assignments must be non-negative with rows summing to 1 (within "
            f"{_ROW_SUM_ATOL:g}); got minimum {float(a.min()):.4g} and row sums in "
            f"[{float(row_sums.min()):.6g}, {float(row_sums.max()):.6g}]. Pass torch.softmax(logits, dim=1)."
        )


def _check_mask(mask: Tensor, ref_name: str, ref: Tensor) -> Tensor:
    """Validate a 0/1 or boolean mask of the shape of ``ref`` and return it as a boolean tensor on its device."""
    _check_same_shape("mask", mask, ref_name, ref)
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be boolean or contain only 0 and 1")
        mask = mask != 0
    mask = mask.to(ref.device)
    if not bool(mask.any()):
        raise ValueError(f"mask selects no entries (all False over shape {tuple(mask.shape)}); the loss is undefined")
    return mask


def _check_positive(name: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _entropy(p: Tensor) -> Tensor:
    """Shannon entropy ``-sum p log p`` over the last dimension with ``0 log 0 = 0``.

    Zero entries are replaced by 1 inside the logarithm, so they contribute exactly 0 to the value and a zero
    gradient (the true derivative, ``-log p - 1``, diverges at 0). ``xlogy(p, p)`` has the right value but a NaN
    gradient at 0, which is why it is not used.
    """
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return -(p * safe.log()).sum(dim=-1)
