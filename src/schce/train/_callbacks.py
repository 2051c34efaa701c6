"""Callbacks: the training history, best-epoch weight selection, frozen modules and the state a resumed run needs."""

from __future__ import annotations

import copy
import math
from typing import Any

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

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: [list(r) for r in rows] for k, rows in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [(int(e), float(v)) for e, v in rows] for k, rows in state_dict["history"].items()}


class BestWeights(pl.Callback):
    """Keeps the module weights of the epoch with the best monitored value and restores them when training ends.

    In memory, so nothing is written to disk; ``best_epoch`` and ``best_score`` tell what was kept. Its state
    (the kept weights included) goes into Lightning checkpoints, so a resumed run keeps the same best epoch.
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

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "weights": self._state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = float(state_dict["best_score"]), state_dict["best_epoch"]
        self._state = state_dict["weights"]


class TrainingProgress(pl.Callback):
    """Records how far into its epoch training is and the RNG state, so a resumed run continues identically.

    Lightning checkpoints hold the weights, optimiser, scheduler and loop counters, but neither the position in a
    sampler's epoch nor the random number generators (dropout, augmentation). This callback saves both; on resume it
    points ``sampler`` (an :class:`~schce.data._loader.EpochBatchSampler`) at the first batch not yet trained on and
    puts the RNG state back just before the next training step.

    Parameters
    ----------
    sampler
        The training loader's batch sampler.
    fingerprint
        What must match between the interrupted and the resumed run (seed, data sizes, batch size); a mismatch is an
        error, since resuming would silently train a different model.
    """

    def __init__(self, sampler, fingerprint: dict[str, Any] | None = None):
        self.sampler = sampler
        self.fingerprint = dict(fingerprint or {})
        self.epoch, self.done = 0, 0
        self._pending_rng: dict[str, Any] | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            self.epoch, self.done = trainer.current_epoch, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        self.epoch, self.done = trainer.current_epoch, batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": self.done, "fingerprint": self.fingerprint, "rng": _get_rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("fingerprint", {})
        differ = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
            raise ValueError(
                f"The checkpoint was written by a different training run ({detail}); resume with the same data and "
                "arguments, or start afresh without ckpt_path."
            )
        epoch, done = int(state_dict["epoch"]), int(state_dict["done"])
        if done >= len(self.sampler):  # saved at the end of an epoch: continue with the next one
            epoch, done = epoch + 1, 0
        self.epoch, self.done = epoch, done
        self.sampler.resume(epoch, done)
        self._pending_rng = state_dict["rng"]


def _get_rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
