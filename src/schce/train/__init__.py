"""Training: one validated config, the runner, the Lightning training plan, its callbacks and the named recipes."""

from schce.train._calibration import fit_temperature
from schce.train._callbacks import BestWeights, FrozenModules, HistoryRecorder, WeightAveraging
from schce.train._config import TrainConfig
from schce.train._plan import LOSSES, OPTIMIZERS, HCETrainingPlan
from schce.train._recipe import RECIPES, Recipe
from schce.train._runner import FitResult, fit

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "BestWeights",
    "FitResult",
    "FrozenModules",
    "HCETrainingPlan",
    "HistoryRecorder",
    "RECIPES",
    "Recipe",
    "TrainConfig",
    "WeightAveraging",
    "fit",
    "fit_temperature",
]
