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


class WeightAveraging(pl.Callback):
    """An exponential moving average (EMA) of the module's trainable weights along the training trajectory.

    After the ``n``-th optimiser step the average is ``Σ_k decay^(n−k) · w_k / Σ_k decay^(n−k)`` over the weights
    ``w_1 … w_n`` after each step: the exponential moving average ``ema ← decay · ema + (1 − decay) · w``,
    bias-corrected as Adam's moments are, so it starts at the first step's weights rather than being pulled towards
    the initial ones (``decay`` = 0.9 weighs about the last 10 steps, 0.99 the last 100). Validation sees the averaged
    weights (the training weights are put back when it ends, so checkpoints hold both: the training weights as the
    model's and the average in this callback's state), so the best epoch, calibration and prediction all use them.
    Buffers (batch-norm statistics, input scaling) are the live module's. With ``load_at_end`` the average is
    loaded into the module when training ends (runs without validation; otherwise :class:`BestWeights` keeps the
    averaged weights of the best epoch).

    Parameters
    ----------
    decay
        The EMA factor per optimiser step, in ``(0, 1)``.
    load_at_end
        Load the averaged weights into the module at the end of training.
    """

    def __init__(self, decay: float, load_at_end: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must lie strictly between 0 and 1, got {decay}.")
        self.decay, self.load_at_end = float(decay), load_at_end
        self.n_updates, self._last_step = 0, -1
        self.average: dict[str, torch.Tensor] | None = None
        self._training: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _params(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {name: p for name, p in pl_module.module.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:  # no optimiser step yet (gradient accumulation)
            return
        self._last_step = trainer.global_step
        params = self._params(pl_module)
        with torch.no_grad():
            if self.average is None:
                self.average = {name: p.detach().clone() for name, p in params.items()}
            else:
                self._to_device(params)
                # Bias-corrected update: d_n = decay · (1 − decay^n) / (1 − decay^(n+1)) after n earlier steps.
                n, decay = self.n_updates, self.decay
                d = decay * (1.0 - decay**n) / (1.0 - decay ** (n + 1))
                for name, p in params.items():
                    self.average[name].mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.n_updates += 1

    def _to_device(self, params: dict[str, torch.Tensor]) -> None:
        # An average restored from a checkpoint is on the CPU.
        for name, p in params.items():
            if self.average[name].device != p.device:
                self.average[name] = self.average[name].to(p.device)

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.average is None or self._training is not None:
            return
        params = self._params(pl_module)
        self._to_device(params)
        with torch.no_grad():
            self._training = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.average[name])

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._training is None:
            return
        with torch.no_grad():
            for name, p in self._params(pl_module).items():
                p.copy_(self._training[name])
        self._training = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)
        if self.load_at_end:
            self._swap_in(pl_module)
            self._training = None  # the average stays

    def state_dict(self) -> dict[str, Any]:
        average = None if self.average is None else {k: v.detach().cpu().clone() for k, v in self.average.items()}
        return {"decay": self.decay, "n_updates": self.n_updates, "last_step": self._last_step, "average": average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if float(state_dict["decay"]) != self.decay:
            raise ValueError(
                f"The checkpoint averaged weights with ema_decay={state_dict['decay']}, this run asks for "
                f"{self.decay}; resume with the same ema_decay."
            )
        self.n_updates, self._last_step = int(state_dict["n_updates"]), int(state_dict["last_step"])
        self.average = state_dict["average"]
