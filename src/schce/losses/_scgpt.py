"""scGPT's objectives (Cui et al., Nature Methods 2024): masked values, zero inflation, elastic cell similarity."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from schce.losses._validation import (
    _check_float,
    _check_mask,
    _check_same_shape,
)

# --------------------------------------------------------------------------------------------------------------------
# scGPT objectives
# --------------------------------------------------------------------------------------------------------------------


def masked_mse_loss(input: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the masked entries, ``sum((input - target)^2 * mask) / sum(mask)`` (as in scGPT).

    Entries outside the mask are dropped with :func:`torch.where`, so they never contribute, even if non-finite.

    Parameters
    ----------
    input
        Predictions, any shape, floating (typically ``(N, G)``).
    target
        Targets, the shape of ``input``; cast to its dtype.
    mask
        Entries to score, the shape of ``input``, boolean or 0/1 valued, at least one entry set.

    Returns
    -------
    Tensor
        Scalar mean squared error over the selected entries.

    Raises
    ------
    ValueError
        If the shapes differ, ``input`` is not floating, ``mask`` is not 0/1 or selects nothing.

    """
    if not isinstance(input, Tensor) or not input.is_floating_point():
        got = f"{input.dtype} {tuple(input.shape)}" if isinstance(input, Tensor) else type(input).__name__
        raise ValueError(f"input must be a floating tensor, got {got}")
    _check_same_shape("target", target, "input", input)
    mask = _check_mask(mask, "input", input)
    sq = (input - target.to(input)).square()
    return torch.where(mask, sq, torch.zeros_like(sq)).sum() / mask.sum()


def criterion_neg_log_bernoulli(probs: Tensor, target: Tensor, mask: Tensor, *, eps: float | None = None) -> Tensor:
    """Masked Bernoulli negative log-likelihood of non-zero expression (scGPT's zero-inflation objective).

    With ``y = (target > 0)`` and ``p = clamp(probs, eps, 1 - eps)``::

        loss = -sum(mask * (y * log(p) + (1 - y) * log(1 - p))) / sum(mask)

    which equals ``-sum(mask * Bernoulli(probs).log_prob(y)) / sum(mask)``. Probabilities of exactly 0 or 1 are
    clamped so the loss stays finite (a confidently wrong prediction costs ``-log(eps)``); their gradient is 0.

    Parameters
    ----------
    probs
        Predicted probabilities that the value is non-zero, any shape (typically ``(N, G)``), floating in ``[0, 1]``.
    target
        Observed values, the shape of ``probs``; only ``target > 0`` is used.
    mask
        Entries to score, the shape of ``probs``, boolean or 0/1 valued, at least one entry set.
    eps
        Clamping margin; defaults to the machine epsilon of ``probs.dtype`` (as :mod:`torch.distributions` does).

    Returns
    -------
    Tensor
        Scalar mean negative log-likelihood over the selected entries.

    Raises
    ------
    ValueError
        If the shapes differ, ``probs`` is not floating in ``[0, 1]``, or ``mask`` is not 0/1 or selects nothing.

    """
    if not isinstance(probs, Tensor) or not probs.is_floating_point():
        got = f"{probs.dtype} {tuple(probs.shape)}" if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a floating tensor, got {got}")
    _check_same_shape("target", target, "probs", probs)
    mask = _check_mask(mask, "probs", probs)
    if probs.numel() and not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError(
            f"probs must lie in [0, 1], got values in [{float(probs.min()):.4g}, {float(probs.max()):.4g}]; "
            "pass torch.sigmoid(logits)"
        )
    eps = torch.finfo(probs.dtype).eps if eps is None else float(eps)
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    p = probs.clamp(eps, 1 - eps)
    nonzero = target.to(probs.device) > 0
    log_lik = torch.where(nonzero, p.log(), torch.log1p(-p))
    return -torch.where(mask, log_lik, torch.zeros_like(log_lik)).sum() / mask.sum()


def elastic_cell_similarity_loss(
    cell_emb: Tensor, ecs_threshold: float = 0.8, pairs: Literal["all", "off_diagonal"] = "all"
) -> Tensor:
    """Elastic cell similarity (ECS) objective of scGPT.

    With ``s_ij = relu(cos(e_i, e_j))`` from L2-normalised embeddings and the diagonal set to ``s_ii = 0``::

        loss = mean over all N^2 entries (i, j) of (1 - (s_ij - ecs_threshold)^2)      # pairs="all" (default)
        loss = mean over the N (N - 1) pairs i != j of the same terms                  # pairs="off_diagonal"

    ``"all"`` is scGPT's definition: its code zeroes the diagonal of the similarity matrix and averages over every
    entry, so each cell adds the constant ``1 - ecs_threshold^2`` and the gradient is ``(N - 1) / N`` times that of
    ``"off_diagonal"``. ``"off_diagonal"`` averages over distinct pairs only (schce's earlier default). Minimising
    either pushes similarities above the threshold up and those below it down (towards 0). Rows are normalised with
    ``eps = 1e-12``, so an all-zero embedding has cosine 0 with everything and finite gradients.

    Parameters
    ----------
    cell_emb
        Cell embeddings, shape ``(N, D)``, floating, ``N >= 2``.
    ecs_threshold
        Similarity threshold, in ``[0, 1]``.
    pairs
        ``"all"`` (scGPT) or ``"off_diagonal"``, see above.

    Returns
    -------
    Tensor
        Scalar loss in ``[1 - max(t, 1 - t)^2, 1]`` for threshold ``t``.

    Raises
    ------
    ValueError
        If ``cell_emb`` is not a floating ``(N, D)`` tensor with ``N >= 2``, the threshold is outside ``[0, 1]`` or
        ``pairs`` is neither value.

    """
    _check_float("cell_emb", cell_emb, 2, "(N, D)")
    n = cell_emb.shape[0]
    if n < 2:
        raise ValueError(f"cell_emb must have shape (N, D) with N >= 2 to form pairs, got {tuple(cell_emb.shape)}")
    if not 0 <= ecs_threshold <= 1:
        raise ValueError(f"ecs_threshold must lie in [0, 1], got {ecs_threshold!r}")
    if pairs not in ("all", "off_diagonal"):
        raise ValueError(f"pairs must be 'all' (scGPT's ECS) or 'off_diagonal', got {pairs!r}")
    normed = F.normalize(cell_emb, p=2, dim=1, eps=1e-12)
    diagonal = torch.eye(n, dtype=torch.bool, device=cell_emb.device)
    similarity = F.relu((normed @ normed.T).masked_fill(diagonal, 0.0))
    terms = 1 - (similarity - ecs_threshold).square()
    return terms.mean() if pairs == "all" else terms[~diagonal].mean()
