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

from schce.losses._batch import BatchMixingLoss, DomainAdversarialLoss, GradientReversal, grad_reverse
from schce.losses._clusters import ClusteringCompactnessLoss, ShannonDiversityLoss, SimpsonDiversityLoss
from schce.losses._scgpt import criterion_neg_log_bernoulli, elastic_cell_similarity_loss, masked_mse_loss
from schce.losses._velocity import VelocityConsistencyLoss

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
