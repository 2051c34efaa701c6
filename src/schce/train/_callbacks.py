"""Callbacks: the training history, best-epoch weight selection and frozen modules."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch


class HistoryRecorder(pl.Callback):
    """Collects every epoch's logged metrics into ``history`` (metric → list of ``(epoch, value)``)."""

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for key, value in trainer.callback_metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.history.setdefault(key, []).append((trainer.current_epoch, float(value)))


class BestWeights(pl.Callback):
    """Keeps the module weights of the epoch with the best monitored value and restores them when training ends.

    In memory, so nothing is written to disk; ``best_epoch`` and ``best_score`` tell what was kept.
    """

    def __init__(self, monitor: str, mode: str = "max"):
        self.monitor, self.mode = monitor, mode
        self.best_score = -math.inf if mode == "max" else math.inf
        self.best_epoch: int | None = None
        self._state: dict | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        better = score > self.best_score if self.mode == "max" else score < self.best_score
        if better:
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self._state = copy.deepcopy(pl_module.module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.module.load_state_dict(self._state)


class FrozenModules(pl.Callback):
    """Keeps ``modules`` in eval mode during training (BatchNorm statistics and dropout frozen with the weights).

    Their parameters should also have ``requires_grad=False``; Lightning puts the whole module in train mode every
    epoch, so eval mode is restored before every training batch.
    """

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        for m in self.modules:
            m.eval()
