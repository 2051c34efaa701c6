"""Training: the Lightning training plan, its callbacks and the named recipes."""

from schce.train._calibration import fit_temperature
from schce.train._callbacks import BestWeights, FrozenModules, HistoryRecorder
from schce.train._plan import LOSSES, OPTIMIZERS, HCETrainingPlan
from schce.train._recipe import RECIPES, Recipe

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "BestWeights",
    "FrozenModules",
    "HCETrainingPlan",
    "HistoryRecorder",
    "RECIPES",
    "Recipe",
    "fit_temperature",
]
