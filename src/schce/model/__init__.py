"""The user-facing classifier, :class:`HCEClassifier`, over set-up, training, inference and persistence files."""

from schce.model._classifier import DEFAULT_BACKBONE_KWARGS, MONITOR, HCEClassifier

__all__ = ["DEFAULT_BACKBONE_KWARGS", "HCEClassifier", "MONITOR"]
