"""The user-facing classifier, :class:`HCEClassifier`, over set-up, training, inference and persistence files."""

from schce._constants import LOSSES, MONITOR
from schce.model._classifier import HCEClassifier
from schce.model._state import SetupState
from schce.train._config import DEFAULT_BACKBONE_KWARGS

__all__ = ["DEFAULT_BACKBONE_KWARGS", "HCEClassifier", "LOSSES", "MONITOR", "SetupState"]
