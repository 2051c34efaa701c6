"""Training settings: defaults per backbone and one validated :class:`TrainConfig` per run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from schce._constants import MONITOR
from schce.data._protocol import check_batch_size
from schce.train._checkpoints import check_checkpoint_args
from schce.train._recipe import PAPER_MONITOR, default_batch_size, get_recipe, resolve_optimizer

# Classifier defaults per backbone, chosen on held-out batches of real PBMCs (leave-one-batch-out): a wider,
# shallower MLP than scTab's 8 × 128 generalises better across batches at small and medium scale.
DEFAULT_BACKBONE_KWARGS = {
    "mlp": {"n_hidden": 256, "n_layers": 3, "dropout": 0.2, "input_dropout": 0.2},
    "linear": {},
    # scTab's TabNet with a variance floor in its input batch norm, so eval-mode inputs stay in the range that small
    # training batches produce (docs/training.md).
    "tabnet": {"initial_bn_eps": 1.0},
}
# Standardised inputs by default: they help the MLP across batches and, with L-BFGS and an L2 penalty, the linear
# model (docs/training.md); TabNet's input batch norm already standardises.
DEFAULT_STANDARDIZE = {"mlp": True, "linear": True, "tabnet": False}
# AdamW (lr, weight decay) per backbone; TabNet's are the published recipe, which it needs to train at all.
DEFAULT_OPTIMIZER = {"linear": (5e-4, 0.01), "mlp": (5e-4, 0.01), "tabnet": (5e-3, 0.05)}
# L2 strength of the full-batch L-BFGS linear model: symphony leave-one-batch-out needs ≥ 0.03 to transfer across
# batches (0.81 -> 0.84 corrected macro F1); pancreas prefers more, pbmc68k is flat (docs/training.md).
LBFGS_L2 = 0.1
#: ``early_stopping_monitor`` → the logged quantity (``None``: the validation metric, by recipe). Without a recipe
#: the default is the class-weighted validation loss: on the five real-data tasks (500-900 training cells, 10% held
#: out) it chose better epochs than the macro F1 of a few validation cells on every task (docs/method.md).
MONITORS = {
    "f1": None,
    "loss": "validation_loss",
    "weighted_loss": "validation_weighted_loss",
    "macro_loss": "validation_macro_loss",
}
# Epochs of train() without a recipe (a recipe sets its own; early stopping usually ends a run sooner).
DEFAULT_MAX_EPOCHS = 100


@dataclass
class TrainConfig:
    """One training run's settings, validated once; ``train`` and ``fine_tune`` describe each field.

    ``None`` fields are filled by :meth:`resolve` from the backbone, the recipe and the data.
    """

    max_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    lr_gamma: float | None = None
    optimizer: str | None = None
    early_stopping: bool = True
    early_stopping_patience: int = 10
    class_weights: str | None = "balanced"
    accelerator: str = "auto"
    devices: int | str = 1
    seed: int = 0
    enable_progress_bar: bool = True
    calibrate: bool = True
    auxiliary: dict[str, float] = field(default_factory=dict)
    ecs_threshold: float = 0.8
    ema_decay: float | None = None
    label_smoothing: float = 0.0
    checkpoint_dir: str | os.PathLike | None = None
    ckpt_path: str | os.PathLike | None = None
    checkpoint_every_n_steps: int | None = None
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    #: What early stopping, best weights and ``best.ckpt`` follow: ``"f1"`` (the validation metric, highest),
    #: ``"loss"`` / ``"weighted_loss"`` (the validation loss, unweighted / class-weighted, lowest); ``None``: the
    #: recipe's metric with a recipe, else the validation loss weighted as the training loss is.
    early_stopping_monitor: str | None = None
    #: The validation metric early stopping, best weights and checkpoints follow (set by :meth:`resolve`).
    monitor: str = MONITOR
    #: Whether validation follows the published recipe (paper's corrected targets and metric; set by :meth:`resolve`).
    paper_validation: bool = field(init=False, default=False)
    #: The checkpoint a resumed run starts from (``ckpt_path`` resolved; ``"last"`` is ``checkpoint_dir/last.ckpt``).
    resume_from: Path | None = field(init=False, default=None)

    def __post_init__(self):
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {self.max_epochs}.")
        check_batch_size(self.batch_size)
        if self.class_weights not in ("balanced", None):
            raise ValueError(f"class_weights must be 'balanced' or None, got {self.class_weights!r}.")
        if self.early_stopping_monitor is not None and self.early_stopping_monitor not in MONITORS:
            raise ValueError(
                f"early_stopping_monitor must be one of {list(MONITORS)}, got {self.early_stopping_monitor!r}."
            )
        if self.early_stopping_monitor == "weighted_loss" and self.class_weights is None:
            raise ValueError(
                'early_stopping_monitor="weighted_loss" weighs the validation loss by the class weights: keep '
                'class_weights="balanced", or monitor "loss".'
            )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(
                f"ema_decay must lie strictly between 0 and 1 (e.g. 0.9), or be None for no averaging; got "
                f"{self.ema_decay}."
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1) (e.g. 0.1; 0 is off), got {self.label_smoothing}.")
        self.checkpoint_dir, self.resume_from = check_checkpoint_args(
            self.checkpoint_dir, self.ckpt_path, self.checkpoint_every_n_steps
        )

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any], **overrides) -> TrainConfig:
        """A config from a method's arguments (``locals()``): the entries named as fields, then ``overrides``."""
        names = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in arguments.items() if k in names and k not in overrides}, **overrides)

    @property
    def stochastic(self) -> list[str]:
        """The random training terms asked for (they rule out L-BFGS)."""
        return [f"{k}_weight" for k, w in self.auxiliary.items() if w]

    def resolve(self, backbone: str, recipe: str | None, n_values: int | None, augment: bool = False) -> TrainConfig:
        """The epochs, optimiser, learning rate, weight decay, StepLR factor, clipping and monitor of this run.

        ``n_values`` is the training data held in memory (cells × genes; ``None`` for streamed data), which decides
        whether full-batch L-BFGS is the default of the linear model.
        """
        settings = get_recipe(recipe, backbone) if recipe else None
        optimizer = resolve_optimizer(
            self.optimizer,
            backbone=backbone,
            recipe=recipe,
            n_values=n_values,
            devices=self.devices,
            batch_size=self.batch_size,
            stochastic=self.stochastic + ["augment"] * augment,
            gradient_clip_val=self.trainer_kwargs.get("gradient_clip_val"),
            averaging=self.ema_decay is not None,
        )
        default_lr, default_wd = DEFAULT_OPTIMIZER.get(backbone, DEFAULT_OPTIMIZER["mlp"])
        if settings is not None:
            default_lr, default_wd = settings.lr, settings.weight_decay
        if optimizer == "lbfgs":
            default_wd = LBFGS_L2
        lr = default_lr if self.lr is None else self.lr
        weight_decay = default_wd if self.weight_decay is None else self.weight_decay
        lr_gamma = (settings.lr_gamma if settings else 0.98) if self.lr_gamma is None else self.lr_gamma
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        # L-BFGS runs unclipped (a user's clipping value already made the automatic choice AdamW).
        clip = None if optimizer == "lbfgs" else settings.gradient_clip_val if settings else 1.0
        trainer_kwargs = {"gradient_clip_val": clip, **self.trainer_kwargs}
        if self.max_epochs is not None:
            max_epochs = self.max_epochs
        else:
            max_epochs = settings.max_epochs if settings else DEFAULT_MAX_EPOCHS
        resolved = replace(
            self,
            max_epochs=max_epochs,
            monitor=MONITORS[self._monitor_choice(settings is not None)] or (PAPER_MONITOR if settings else MONITOR),
            optimizer=optimizer,
            lr=lr,
            weight_decay=weight_decay,
            lr_gamma=lr_gamma,
            trainer_kwargs=trainer_kwargs,
        )
        resolved.paper_validation = settings is not None
        return resolved

    def _monitor_choice(self, recipe: bool) -> str:
        """The ``early_stopping_monitor`` of this run: the given one, else by recipe and class weights."""
        if self.early_stopping_monitor is not None:
            return self.early_stopping_monitor
        if recipe:  # the published recipe's validation metric
            return "f1"
        return "weighted_loss" if self.class_weights is not None else "loss"

    @property
    def monitor_mode(self) -> str:
        """``"min"`` for a monitored loss, ``"max"`` for a score."""
        return "min" if self.monitor.endswith("_loss") else "max"

    def batch_size_for(self, n_train: int, recipe: str | None, backbone: str) -> int:
        """Training cells per batch for in-memory data: all of them for L-BFGS, else the given or default size."""
        if self.optimizer == "lbfgs":
            return n_train
        if self.batch_size is not None:
            return self.batch_size
        settings = get_recipe(recipe, backbone) if recipe else None
        return default_batch_size(n_train, settings.max_batch_size if settings else 2048)
