"""Auxiliary losses for single-cell representation learning.

All losses are differentiable, batch-first (cells along dimension 0) and return a scalar tensor. Classes are
:class:`torch.nn.Module` subclasses; the scGPT-style objectives and the gradient reversal are also plain functions.

* :class:`BatchMixingLoss`: negative entropy of the batch labels in each cell's soft k-nearest-neighbour
  neighbourhood; lower means batches are better mixed.
* :class:`ClusteringCompactnessLoss`: within-cluster spread under soft assignments plus a hinge that keeps
  centroids at least ``min_separation`` apart.
* :class:`VelocityConsistencyLoss`: agreement of a predicted RNA velocity with the observed future state, in
  direction (cosine) and in an explicit Euler step (squared error).
* :class:`ShannonDiversityLoss` and :class:`SimpsonDiversityLoss`: per-cell Shannon entropy and Simpson
  concentration of soft cluster assignments.
* :func:`masked_mse_loss`, :func:`criterion_neg_log_bernoulli` and :func:`elastic_cell_similarity_loss`: the
  masked expression-value, zero-inflation and elastic cell similarity (ECS) objectives of scGPT
  (Cui et al., Nature Methods 2024).
* :class:`GradientReversal`, :func:`grad_reverse` and :class:`DomainAdversarialLoss`: domain-adversarial training
  with a gradient reversal layer (Ganin & Lempitsky, ICML 2015).

Invalid shapes or dtypes raise :class:`ValueError` naming the argument, the shape received and the shape expected.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BatchMixingLoss",
    "ClusteringCompactnessLoss",
    "DomainAdversarialLoss",
    "GradientReversal",
    "ShannonDiversityLoss",
    "SimpsonDiversityLoss",
    "VelocityConsistencyLoss",
    "criterion_neg_log_bernoulli",
    "elastic_cell_similarity_loss",
    "grad_reverse",
    "masked_mse_loss",
]

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


# --------------------------------------------------------------------------------------------------------------------
# Batch mixing
# --------------------------------------------------------------------------------------------------------------------


class BatchMixingLoss(nn.Module):
    """Negative entropy of the batch composition of each cell's soft nearest-neighbour neighbourhood.

    For each cell ``i``, the Euclidean distances ``d_ij`` to all other cells are computed (the cell itself is
    excluded) and the ``k = min(n_neighbors, N - 1)`` nearest are kept. Their weights are
    ``w_ij = softmax_j(-d_ij / temperature)`` over these ``k`` neighbours, the neighbourhood batch distribution is
    ``p_ib = sum_j w_ij [batch_j = b]`` and its entropy is ``H_i = -sum_b p_ib log p_ib`` (``0 log 0 = 0``). The loss
    is ``-mean_i H_i``; it lies in ``[-log(n_batches), 0]`` and is lower when batches are better mixed.

    Gradients reach the embeddings through the soft weights ``w_ij`` only: which cells are the ``k`` nearest is a
    discrete choice with no gradient (ties are broken arbitrarily by :func:`torch.topk`). A cell whose neighbours all
    come from one batch has ``H_i = 0`` exactly and contributes no gradient, so when a single batch is present the
    loss is exactly 0 with zero (finite) gradients. Identical embeddings (zero distances) give uniform weights.

    Memory is ``O(N^2)`` for the distance matrix, so use it on mini-batches.

    Parameters
    ----------
    n_batches
        Number of batches ``B`` (``>= 1``); labels lie in ``[0, B)``.
    n_neighbors
        Neighbourhood size ``k`` (``>= 1``); reduced to ``N - 1`` for smaller inputs.
    temperature
        Softmax temperature (``> 0``) on the negative distances; larger values spread the weight more evenly.

    """

    def __init__(self, n_batches: int, n_neighbors: int = 15, temperature: float = 1.0) -> None:
        super().__init__()
        if int(n_batches) != n_batches or n_batches < 1:
            raise ValueError(f"n_batches must be an integer >= 1, got {n_batches!r}")
        if int(n_neighbors) != n_neighbors or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
        _check_positive("temperature", temperature)
        self.n_batches = int(n_batches)
        self.n_neighbors = int(n_neighbors)
        self.temperature = float(temperature)

    def forward(self, embeddings: Tensor, batch_labels: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        embeddings
            Cell embeddings, shape ``(N, D)``, floating, ``N >= 2``.
        batch_labels
            Batch index of every cell, shape ``(N,)``, dtype ``torch.long``, values in ``[0, n_batches)``.

        Returns
        -------
        Tensor
            Scalar ``-mean_i H_i`` in ``[-log(n_batches), 0]``.

        Raises
        ------
        ValueError
            If the shapes or dtypes are wrong, a label is out of range or ``N < 2``.

        """
        _check_float("embeddings", embeddings, 2, "(N, D)")
        n = embeddings.shape[0]
        if n < 2:
            raise ValueError(
                f"embeddings must have shape (N, D) with N >= 2 to have neighbours, got {tuple(embeddings.shape)}"
            )
        labels = _check_labels("batch_labels", batch_labels, n, self.n_batches).to(embeddings.device)
        k = min(self.n_neighbors, n - 1)

        dist = torch.cdist(embeddings, embeddings, compute_mode=_CDIST_MODE)
        # +inf on the diagonal keeps a cell out of its own neighbourhood; k <= N - 1 so it is never selected.
        self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        nn_dist, nn_idx = torch.topk(dist.masked_fill(self_mask, math.inf), k, dim=1, largest=False)
        weights = torch.softmax(-nn_dist / self.temperature, dim=1)  # (N, k)
        nn_batches = F.one_hot(labels[nn_idx], self.n_batches).to(weights.dtype)  # (N, k, B)
        p = torch.einsum("nk,nkb->nb", weights, nn_batches)  # (N, B), rows sum to 1

        # Softmax weights sum to 1 only up to rounding, so a one-batch neighbourhood would give a tiny non-zero
        # entropy (and a gradient); counting the batches present makes those cells exactly 0.
        n_present = (nn_batches.sum(dim=1) > 0).sum(dim=1)
        entropy = torch.where(n_present > 1, _entropy(p), torch.zeros_like(p[:, 0]))
        return -entropy.mean()

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"n_batches={self.n_batches}, n_neighbors={self.n_neighbors}, temperature={self.temperature}"


# --------------------------------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------------------------------


class ClusteringCompactnessLoss(nn.Module):
    """Soft within-cluster compactness plus a hinge on centroid separation.

    With soft assignments ``a`` of shape ``(N, K)`` and centroids ``c`` of shape ``(K, D)``::

        compactness = (1 / N) * sum_i sum_k a_ik * ||x_i - c_k||^2
        separation  = mean over pairs k < l of relu(min_separation - ||c_k - c_l||)^2
        loss        = compactness + separation_weight * separation

    The compactness is normalised by the number of cells ``N`` (not by the total mass, which equals ``N`` when the
    rows of ``a`` sum to 1, nor by ``N * K``). When ``centroids`` is not given, they are the mass-weighted means
    ``c_k = sum_i a_ik x_i / sum_i a_ik`` and gradients flow through them into the embeddings and the
    assignments. A cluster whose mass ``sum_i a_ik`` is at most ``eps`` is treated as empty: its denominator is
    clamped to ``eps`` (so its centroid is ``~0`` and never NaN), it contributes nothing to the compactness (all its
    ``a_ik`` are ~0) and it is left out of the separation pairs. With given centroids all pairs are used. When no
    pair remains (``K = 1`` or a single non-empty cluster) the separation is 0.

    Parameters
    ----------
    separation_weight
        Weight (``>= 0``) of the separation term.
    min_separation
        Margin (``>= 0``): centroid pairs closer than this are penalised quadratically.
    eps
        Mass at or below which a computed cluster counts as empty (keyword only).

    """

    def __init__(self, separation_weight: float = 1.0, min_separation: float = 1.0, *, eps: float = 1e-8) -> None:
        super().__init__()
        _check_non_negative("separation_weight", separation_weight)
        _check_non_negative("min_separation", min_separation)
        _check_positive("eps", eps)
        self.separation_weight = float(separation_weight)
        self.min_separation = float(min_separation)
        self.eps = float(eps)

    def forward(self, embeddings: Tensor, assignments: Tensor, centroids: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        embeddings
            Cell embeddings ``x``, shape ``(N, D)``, floating, ``N >= 1``.
        assignments
            Soft cluster assignments ``a``, shape ``(N, K)``, non-negative with rows summing to 1.
        centroids
            Optional cluster centroids ``c``, shape ``(K, D)``; computed from ``embeddings`` and ``assignments`` when
            ``None``.

        Returns
        -------
        Tensor
            Scalar ``compactness + separation_weight * separation``.

        Raises
        ------
        ValueError
            If the shapes or dtypes are wrong or the assignments are not a distribution per row.

        """
        _check_float("embeddings", embeddings, 2, "(N, D)")
        n, d = embeddings.shape
        if n == 0:
            raise ValueError(f"embeddings must have shape (N, D) with N >= 1, got {tuple(embeddings.shape)}")
        _check_assignments(assignments, n)
        a = assignments.to(embeddings.dtype)
        k = a.shape[1]

        if centroids is None:
            mass = a.sum(dim=0)  # (K,)
            valid = mass > self.eps
            centroids = (a.T @ embeddings) / mass.clamp_min(self.eps).unsqueeze(1)
        else:
            _check_float("centroids", centroids, 2, f"(K, D) = ({k}, {d})")
            if tuple(centroids.shape) != (k, d):
                raise ValueError(f"centroids must have shape (K, D) = ({k}, {d}), got {tuple(centroids.shape)}")
            centroids = centroids.to(embeddings.dtype)
            valid = torch.ones(k, dtype=torch.bool, device=embeddings.device)

        sq_dist = torch.cdist(embeddings, centroids, compute_mode=_CDIST_MODE).square()  # (N, K)
        compactness = (a * sq_dist).sum() / n

        centroid_dist = torch.cdist(centroids, centroids, compute_mode=_CDIST_MODE)  # (K, K)
        upper = torch.ones(k, k, dtype=torch.bool, device=embeddings.device).triu(diagonal=1)
        pairs = upper & valid.unsqueeze(0) & valid.unsqueeze(1)
        hinge = F.relu(self.min_separation - centroid_dist).square()
        # Dividing by max(#pairs, 1) makes the term 0 (not NaN) when no pair is left.
        separation = torch.where(pairs, hinge, torch.zeros_like(hinge)).sum() / pairs.sum().clamp_min(1)
        return compactness + self.separation_weight * separation

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"separation_weight={self.separation_weight}, min_separation={self.min_separation}"


# --------------------------------------------------------------------------------------------------------------------
# RNA velocity
# --------------------------------------------------------------------------------------------------------------------


class VelocityConsistencyLoss(nn.Module):
    """Consistency of a predicted velocity with the observed future expression.

    With expression ``x``, velocity ``v`` and future expression ``y`` (all ``(N, G)``)::

        cosine_term    = mean_i (1 - cos(v_i, y_i - x_i))
        magnitude_term = mean over all N * G entries of (x + dt * v - y)^2
        loss           = cosine_weight * cosine_term + magnitude_weight * magnitude_term

    The cosine uses :func:`torch.nn.functional.cosine_similarity` with ``eps = 1e-8``: when ``v_i`` or the
    displacement ``y_i - x_i`` is the zero vector the cosine counts as 0 (so that cell's cosine term is 1) and the
    value and gradients stay finite.

    Parameters
    ----------
    dt
        Time step of the Euler update ``x + dt * v`` (finite).
    cosine_weight
        Weight (``>= 0``) of the direction term.
    magnitude_weight
        Weight (``>= 0``) of the squared-error term.

    """

    def __init__(self, dt: float = 0.1, cosine_weight: float = 1.0, magnitude_weight: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(dt):
            raise ValueError(f"dt must be finite, got {dt!r}")
        _check_non_negative("cosine_weight", cosine_weight)
        _check_non_negative("magnitude_weight", magnitude_weight)
        self.dt = float(dt)
        self.cosine_weight = float(cosine_weight)
        self.magnitude_weight = float(magnitude_weight)

    def forward(self, expression: Tensor, velocity: Tensor, future_expression: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        expression
            Current expression ``x``, shape ``(N, G)``, floating, ``N >= 1``.
        velocity
            Predicted velocity ``v``, shape ``(N, G)``.
        future_expression
            Observed future expression ``y``, shape ``(N, G)``.

        Returns
        -------
        Tensor
            Scalar loss.

        Raises
        ------
        ValueError
            If the inputs are not floating ``(N, G)`` tensors of one shape or ``N = 0``.

        """
        _check_float("expression", expression, 2, "(N, G)")
        if expression.shape[0] == 0:
            raise ValueError(f"expression must have shape (N, G) with N >= 1, got {tuple(expression.shape)}")
        _check_float("velocity", velocity, 2, f"(N, G) = {tuple(expression.shape)}")
        _check_same_shape("velocity", velocity, "expression", expression)
        _check_float("future_expression", future_expression, 2, f"(N, G) = {tuple(expression.shape)}")
        _check_same_shape("future_expression", future_expression, "expression", expression)

        displacement = future_expression - expression
        cosine = F.cosine_similarity(velocity, displacement, dim=1, eps=1e-8)
        cosine_term = (1 - cosine).mean()
        magnitude_term = (expression + self.dt * velocity - future_expression).square().mean()
        return self.cosine_weight * cosine_term + self.magnitude_weight * magnitude_term

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"dt={self.dt}, cosine_weight={self.cosine_weight}, magnitude_weight={self.magnitude_weight}"


# --------------------------------------------------------------------------------------------------------------------
# Diversity of soft assignments
# --------------------------------------------------------------------------------------------------------------------


class ShannonDiversityLoss(nn.Module):
    """Mean per-cell Shannon entropy of soft assignments, ``mean_i (-sum_k a_ik log a_ik)``.

    ``0 log 0 = 0``; zero entries get a zero gradient (the exact derivative diverges there). The value lies in
    ``[0, log K]``: 0 for one-hot rows, ``log K`` for uniform rows. Minimise it to sharpen assignments, or subtract
    it from an objective to encourage diversity.
    """

    def forward(self, assignments: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        assignments
            Soft assignments, shape ``(N, K)``, ``N, K >= 1``, non-negative with rows summing to 1 (e.g. a softmax).

        Returns
        -------
        Tensor
            Scalar in ``[0, log K]``.

        Raises
        ------
        ValueError
            If ``assignments`` is not a floating ``(N, K)`` tensor of per-row distributions.

        """
        _check_assignments(assignments)
        return _entropy(assignments).mean()


class SimpsonDiversityLoss(nn.Module):
    """Mean per-cell Simpson concentration of soft assignments, ``mean_i sum_k a_ik^2``.

    The value lies in ``[1/K, 1]``: ``1/K`` for uniform rows, 1 for one-hot rows (it is the probability that two
    independent draws from a row fall in the same cluster).
    """

    def forward(self, assignments: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        assignments
            Soft assignments, shape ``(N, K)``, ``N, K >= 1``, non-negative with rows summing to 1 (e.g. a softmax).

        Returns
        -------
        Tensor
            Scalar in ``[1/K, 1]``.

        Raises
        ------
        ValueError
            If ``assignments`` is not a floating ``(N, K)`` tensor of per-row distributions.

        """
        _check_assignments(assignments)
        return assignments.square().sum(dim=1).mean()


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


# --------------------------------------------------------------------------------------------------------------------
# Domain-adversarial training
# --------------------------------------------------------------------------------------------------------------------


class _GradientReversalFunction(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-alpha`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        """Return ``x`` unchanged (as a view, so no copy is made)."""
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        """Reverse and scale the gradient; ``alpha`` gets none."""
        return -ctx.alpha * grad_output, None


def grad_reverse(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Gradient reversal: the identity forward, the gradient times ``-alpha`` backward.

    Parameters
    ----------
    x
        Any tensor.
    alpha
        Scale (``>= 0``) of the reversed gradient.

    Returns
    -------
    Tensor
        ``x`` (same shape and values).

    """
    _check_non_negative("alpha", alpha)
    return _GradientReversalFunction.apply(x, float(alpha))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`.

    ``alpha`` is a plain attribute, so a schedule (e.g. DANN's ramp from 0 to 1) can change it during training.

    Parameters
    ----------
    alpha
        Scale (``>= 0``) of the reversed gradient.

    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        _check_non_negative("alpha", alpha)
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x``; its gradient is multiplied by ``-alpha``.

        Parameters
        ----------
        x
            Any tensor.

        Returns
        -------
        Tensor
            ``x`` (same shape and values).

        """
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"alpha={self.alpha}"


class DomainAdversarialLoss(nn.Module):
    """Cross-entropy of a domain discriminator placed behind a gradient reversal layer.

    The discriminator is an MLP with ``n_layers`` hidden blocks ``Linear -> LeakyReLU`` of width ``hidden`` and a
    final ``Linear(., n_domains)`` (``n_layers = 0`` gives a linear classifier). Adding this loss to a training
    objective trains the discriminator to predict the domain (its parameters receive the ordinary gradient) while
    the embeddings, and whatever produced them, receive ``-alpha`` times that gradient and so learn to confuse it.

    Parameters
    ----------
    n_input
        Embedding dimension (``>= 1``).
    n_domains
        Number of domains (``>= 2``).
    hidden
        Width of the hidden layers (``>= 1``).
    n_layers
        Number of hidden ``Linear -> LeakyReLU`` blocks (``>= 0``).
    alpha
        Scale (``>= 0``) of the reversed gradient; settable later through :attr:`alpha`.

    """

    def __init__(self, n_input: int, n_domains: int, hidden: int = 128, n_layers: int = 2, alpha: float = 1.0) -> None:
        super().__init__()
        for name, value, low in (("n_input", n_input, 1), ("n_domains", n_domains, 2), ("hidden", hidden, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if int(n_layers) != n_layers or n_layers < 0:
            raise ValueError(f"n_layers must be an integer >= 0, got {n_layers!r}")
        self.n_input = int(n_input)
        self.n_domains = int(n_domains)
        self.gradient_reversal = GradientReversal(alpha)
        layers: list[nn.Module] = []
        width = self.n_input
        for _ in range(int(n_layers)):
            layers += [nn.Linear(width, int(hidden)), nn.LeakyReLU()]
            width = int(hidden)
        layers.append(nn.Linear(width, self.n_domains))
        self.discriminator = nn.Sequential(*layers)

    @property
    def alpha(self) -> float:
        """Scale of the reversed gradient."""
        return self.gradient_reversal.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        _check_non_negative("alpha", value)
        self.gradient_reversal.alpha = float(value)

    def _check_embeddings(self, embeddings: Tensor) -> None:
        _check_float("embeddings", embeddings, 2, f"(N, n_input) = (N, {self.n_input})")
        if embeddings.shape[1] != self.n_input:
            raise ValueError(
                f"embeddings must have shape (N, n_input) = (N, {self.n_input}), got {tuple(embeddings.shape)}"
            )

    def logits(self, embeddings: Tensor) -> Tensor:
        """Domain logits of the discriminator, computed behind the gradient reversal.

        Parameters
        ----------
        embeddings
            Cell embeddings, shape ``(N, n_input)``, floating.

        Returns
        -------
        Tensor
            Logits, shape ``(N, n_domains)``.

        """
        self._check_embeddings(embeddings)
        return self.discriminator(self.gradient_reversal(embeddings))

    def forward(self, embeddings: Tensor, domain_labels: Tensor) -> Tensor:
        """Compute the mean cross-entropy of the discriminator on the domain labels.

        Parameters
        ----------
        embeddings
            Cell embeddings, shape ``(N, n_input)``, floating, ``N >= 1``.
        domain_labels
            Domain of every cell, shape ``(N,)``, dtype ``torch.long``, values in ``[0, n_domains)``.

        Returns
        -------
        Tensor
            Scalar cross-entropy.

        Raises
        ------
        ValueError
            If the shapes or dtypes are wrong, a label is out of range or ``N = 0``.

        """
        self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        if n == 0:
            raise ValueError(
                f"embeddings must have shape (N, {self.n_input}) with N >= 1, got {tuple(embeddings.shape)}"
            )
        labels = _check_labels("domain_labels", domain_labels, n, self.n_domains).to(embeddings.device)
        return F.cross_entropy(self.logits(embeddings), labels)

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"n_input={self.n_input}, n_domains={self.n_domains}"
