"""Loss functions: the hierarchical cross-entropy (HCE) over a label hierarchy and its log-space primitives."""

from schce.losses.hce import (
    HierarchicalCrossEntropyLoss,
    hierarchical_cross_entropy,
    hierarchical_log_probs,
    log_mask_probability,
)

__all__ = [
    "HierarchicalCrossEntropyLoss",
    "hierarchical_cross_entropy",
    "hierarchical_log_probs",
    "log_mask_probability",
]
