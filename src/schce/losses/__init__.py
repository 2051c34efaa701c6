"""Loss functions.

The hierarchical cross-entropy (HCE) over a label hierarchy and its log-space primitives (:mod:`schce.losses.hce`),
and auxiliary single-cell losses (:mod:`schce.losses.singlecell`): batch mixing, clustering compactness, RNA
velocity consistency, assignment diversity, scGPT's masked-value, zero-inflation and elastic cell similarity
objectives, and domain-adversarial training through gradient reversal.
"""

from schce.losses.hce import (
    HierarchicalCrossEntropyLoss,
    hierarchical_cross_entropy,
    hierarchical_log_probs,
    log_mask_probability,
)
from schce.losses.singlecell import (
    BatchMixingLoss,
    ClusteringCompactnessLoss,
    DomainAdversarialLoss,
    GradientReversal,
    ShannonDiversityLoss,
    SimpsonDiversityLoss,
    VelocityConsistencyLoss,
    criterion_neg_log_bernoulli,
    elastic_cell_similarity_loss,
    grad_reverse,
    masked_mse_loss,
)

__all__ = [
    "HierarchicalCrossEntropyLoss",
    "hierarchical_cross_entropy",
    "hierarchical_log_probs",
    "log_mask_probability",
    # auxiliary single-cell losses
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
