"""The user-facing models: :class:`HCEClassifier` and its seed ensemble :class:`HCEEnsemble`."""

from schce._constants import LOSSES, MONITOR
from schce.model._classifier import HCEClassifier
from schce.model._ensemble import HCEEnsemble
from schce.model._state import SetupState
from schce.train._config import DEFAULT_BACKBONE_KWARGS

__all__ = ["DEFAULT_BACKBONE_KWARGS", "HCEClassifier", "HCEEnsemble", "LOSSES", "MONITOR", "SetupState"]
