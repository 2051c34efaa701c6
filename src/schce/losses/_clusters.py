"""Cluster terms: compactness and separation of soft clusters, and the diversity of soft assignments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from schce.losses._validation import (
    _CDIST_MODE,
    _check_assignments,
    _check_float,
    _check_non_negative,
    _check_positive,
    _entropy,
)

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
