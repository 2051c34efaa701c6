"""Training: the Lightning training plan and its callbacks."""

from schce.train._calibration import fit_temperature
from schce.train._callbacks import BestWeights, FrozenModules, HistoryRecorder
from schce.train._plan import LOSSES, HCETrainingPlan

__all__ = ["LOSSES", "BestWeights", "FrozenModules", "HCETrainingPlan", "HistoryRecorder", "fit_temperature"]
