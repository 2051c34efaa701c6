"""The training runner: one path from a data module and a :class:`TrainConfig` to trained, calibrated weights.

:meth:`~schce.HCEClassifier.train` and :meth:`~schce.HCEClassifier.fine_tune` both end here, whatever the data
(AnnData, scTab store, census): class weights, targets, the training plan, callbacks, the Lightning Trainer, the
history, the best epoch and temperature scaling are decided in one place.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from schce._memory import release_free_memory
from schce.data._protocol import check_datamodule, datamodule_class_weights, datamodule_macro_weights
from schce.nn._batch import Densifier, batch_rows, is_sparse
from schce.nn._module import gene_moments
from schce.train._calibration import fit_temperature
from schce.train._callbacks import BestWeights, HistoryRecorder, TrainingProgress, WeightAveraging
from schce.train._checkpoints import checkpoint_callbacks
from schce.train._config import MONITORS, TrainConfig
from schce.train._plan import HCETrainingPlan
from schce.train._recipe import matmul_precision

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What a run leaves on the model: per-metric history, the epoch whose weights were kept, the temperature."""

    history: dict[str, pd.DataFrame]
    best_epoch: int | None
    temperature: float
    optimizer: str


@contextlib.contextmanager
def quiet_lightning_info():
    """Hide Lightning's start-up chatter (accelerator lines, tips) but keep its warnings."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        yield
    finally:
        rank_zero.setLevel(level)


@contextlib.contextmanager
def _known_lightning_warnings(resuming: bool):
    """Hide the Lightning warnings that do not apply to schce's training (each reason below); keep the others."""
    with warnings.catch_warnings():
        # TrainingProgress restores the data order mid-epoch, which Lightning cannot see from the loader.
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
        # The store and census datasets split their rows between loader workers and ranks, so their length is exact.
        warnings.filterwarnings("ignore", message=".*`IterableDataset` has `__len__` defined")
        # Without validation cells (validation_size=0) the data modules give an empty validation loader by design.
        warnings.filterwarnings("ignore", message="Total length of .* across ranks is zero")
        if resuming:  # the run's own checkpoint directory
            warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        yield


def progress(loader, desc: str):
    """``loader`` with a progress bar of batches, shown only when the pass is long enough to wait for."""
    try:
        total = len(loader)
    except TypeError:
        total = None
    return tqdm(loader, desc=desc, unit="batch", total=total, disable=total is not None and total < 20)


def iter_loader_outputs(module, loader, normalize: bool, desc: str = "Predicting"):
    """Yield ``{"logits", "embeddings"}`` (float32, CPU), with ``y`` / ``idx`` if given, batch by batch.

    Eval mode, no gradients; only one batch's outputs are alive at a time unless the caller keeps them.
    """
    device = next(module.parameters()).device
    module.eval()
    densify = Densifier()  # sparse batches: densified on the device into one reused buffer
    for batch in progress(loader, desc):
        with torch.inference_mode():
            logits, h = module(densify(batch, device), normalize=normalize, inplace=is_sparse(batch))
            out = {"logits": logits.float().cpu(), "embeddings": h.float().cpu()}
            out.update({key: batch[key].cpu() for key in ("y", "idx") if key in batch})
        yield out


def loader_outputs(module, loader, normalize: bool, desc: str = "Predicting") -> dict[str, np.ndarray]:
    """Logits and embeddings of every batch of ``loader`` (eval mode, no gradients), with ``y`` / ``idx`` if given."""
    out: dict[str, list] = {"logits": [], "embeddings": []}
    for batch in iter_loader_outputs(module, loader, normalize, desc):
        for key, value in batch.items():
            out.setdefault(key, []).append(value)
    return {k: torch.cat(v).numpy() if v else np.empty((0, 0), np.float32) for k, v in out.items()}


def fit_input_scaling(module, datamodule, normalize: bool) -> None:
    """Set the module's per-gene standardisation from the training cells (a sample of an atlas data module).

    One pass over the data module's :meth:`scaling_loader`; sparse batches are summed from their stored values alone.
    A progress bar counts cells (shown when the pass reads 20 batches or more).
    """
    loader, max_cells = datamodule.scaling_loader()
    try:
        n_batches = len(loader)
    except TypeError:
        n_batches = None
    n_cells = datamodule.n_cells("train")
    total = n_cells if max_cells is None else min(max_cells, n_cells)
    iterator = iter(loader)
    bar = tqdm(
        desc="Gene scaling",
        unit="cell",
        unit_scale=True,
        leave=False,
        total=total,
        disable=n_batches is not None and n_batches < 20,
    )

    def counted():
        for batch in iterator:
            yield batch
            bar.update(batch_rows(batch))

    try:
        mean, std, n = gene_moments(counted(), normalize, max_cells)
    finally:
        bar.close()
        # Stop this pass's loader workers now (it ends early on an atlas), before training starts its own.
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    module.set_input_scaling(mean, std)
    logger.info("Standardising %d genes with the mean and scale of %d training cells.", len(mean), n)


def calibrate(logits: np.ndarray, targets: np.ndarray, R: np.ndarray, hierarchical: bool = True) -> float:
    """Temperature scaling on held-out logits; logs the expected calibration error before and after.

    ``hierarchical=False`` (flat cross-entropy) fits the temperature to exact matches; the logged error always
    uses the hierarchy-corrected rule.
    """
    from schce.metrics import correct_codes, expected_calibration_error

    temperature = fit_temperature(logits, targets, R if hierarchical else None)

    def ece(t: float) -> float:
        probs = torch.softmax(torch.from_numpy(logits).double() / t, dim=1).numpy()
        pred = probs.argmax(1)
        correct = correct_codes(targets, pred, R) == targets
        return expected_calibration_error(probs.max(1), correct)

    logger.info(
        "Calibrated on %d validation cells: temperature %.3f, expected calibration error %.4f -> %.4f.",
        len(targets),
        temperature,
        ece(1.0),
        ece(temperature),
    )
    return temperature


def _callbacks(config: TrainConfig, datamodule, has_val: bool, extra: Sequence[pl.Callback]):
    """The run's callbacks: loader resumption, history, ``extra``, best weights, early stopping, user's, checkpoints."""
    history = HistoryRecorder()
    callbacks: list[pl.Callback] = [history, *extra]
    order = datamodule.resumable_order()
    if order is not None:
        callbacks.insert(0, TrainingProgress(*order))
    # L-BFGS solves a convex problem: its answer is the converged optimum, not the iterate that scored best on
    # the validation cells, and it stops when the training loss stops falling.
    best = BestWeights(config.monitor, config.monitor_mode) if has_val and config.optimizer != "lbfgs" else None
    if best is not None:
        callbacks.append(best)
        if config.early_stopping:
            callbacks.append(
                pl.callbacks.EarlyStopping(
                    config.monitor, mode=config.monitor_mode, patience=config.early_stopping_patience, check_finite=True
                )
            )
    elif config.optimizer == "lbfgs" and config.early_stopping:
        callbacks.append(pl.callbacks.EarlyStopping("train_loss", mode="min", min_delta=1e-6, patience=1))
    if config.ema_decay is not None:
        # After BestWeights: validation (and so the kept best weights) sees the average; without validation the
        # average is what training leaves.
        callbacks.append(WeightAveraging(config.ema_decay, load_at_end=best is None))
    callbacks += list(config.trainer_kwargs.get("callbacks") or [])
    if config.checkpoint_dir is not None:
        monitor = config.monitor if has_val else None
        callbacks += checkpoint_callbacks(
            config.checkpoint_dir, monitor, config.checkpoint_every_n_steps, config.monitor_mode
        )
    return callbacks, history, best


def _trainer(config: TrainConfig, callbacks: list[pl.Callback], n_train_batches: int) -> pl.Trainer:
    """The Lightning Trainer of a run (quiet start-up; schce's own sampling, checkpoints only when asked)."""
    trainer_kwargs = {k: v for k, v in config.trainer_kwargs.items() if k != "callbacks"}
    with quiet_lightning_info():
        return pl.Trainer(
            max_epochs=config.max_epochs,
            accelerator=config.accelerator,
            devices=config.devices,
            logger=False,
            # Our samplers shard the training cells themselves (and keep their order resumable).
            use_distributed_sampler=False,
            enable_checkpointing=config.checkpoint_dir is not None,
            enable_model_summary=False,
            enable_progress_bar=config.enable_progress_bar,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            log_every_n_steps=max(1, min(50, n_train_batches)),
            **trainer_kwargs,
        )


def fit(
    module,
    hierarchy,
    datamodule,
    config: TrainConfig,
    *,
    n_genes: int,
    loss: str,
    hce_form: str,
    label_semantics: str,
    normalize: bool,
    augmentations: np.ndarray | None = None,
    callbacks: Iterable[pl.Callback] = (),
    validation_weights: np.ndarray | None = None,
) -> FitResult:
    """Train ``module`` on ``datamodule`` with a resolved ``config``, keep the best validation epoch, calibrate.

    ``module`` is trained in place; the returned :class:`FitResult` holds what the model records of the run.
    ``validation_weights``: those of ``early_stopping_monitor="macro_loss"`` when the caller has them already.
    """
    n_labels = hierarchy.n_labels
    check_datamodule(datamodule, n_genes, n_labels)
    if validation_weights is None and config.monitor == MONITORS["macro_loss"]:
        validation_weights = datamodule_macro_weights(datamodule)
    weights = datamodule_class_weights(datamodule, config.class_weights, n_labels)
    target_masks = datamodule.annotation_targets(hierarchy, label_semantics) if loss == "hce-aware" else None
    n_train, n_val = datamodule.n_cells("train"), datamodule.n_cells("val")
    plan = HCETrainingPlan(
        module,
        hierarchy.R,
        loss=loss,
        target_masks=target_masks,
        class_weights=weights,
        normalize=normalize,
        lr=config.lr,
        weight_decay=config.weight_decay,
        lr_gamma=config.lr_gamma,
        hce_form=hce_form,
        auxiliary=config.auxiliary or None,
        n_batches=datamodule.n_batches,
        ecs_threshold=config.ecs_threshold,
        augmentations=augmentations,
        optimizer=config.optimizer,
        paper_validation=config.paper_validation,
        label_smoothing=config.label_smoothing,
        validation_weights=validation_weights,
    )
    train_dl = datamodule.train_dataloader()
    all_callbacks, history, best = _callbacks(config, datamodule, n_val > 0, list(callbacks))
    trainer = _trainer(config, all_callbacks, len(train_dl))
    logger.info(
        "Training %s with %s%s on %d cells (%d for validation), batch size %d, up to %d epochs.",
        loss.upper(),
        "full-batch L-BFGS" if config.optimizer == "lbfgs" else "AdamW",
        "" if config.ema_decay is None else f" (EMA of the weights, decay {config.ema_decay})",
        n_train,
        n_val,
        datamodule.batch_size,
        config.max_epochs,
    )
    module.train()  # a trained model is left in eval mode; Lightning keeps the mode it finds
    with quiet_lightning_info(), matmul_precision("high"), _known_lightning_warnings(config.resume_from is not None):
        release_free_memory()  # before the loader workers fork from this process
        trainer.fit(plan, datamodule=datamodule, ckpt_path=config.resume_from)
    module.eval()
    temperature = 1.0
    if config.calibrate and n_val:
        out = loader_outputs(module, datamodule.val_dataloader(), normalize, desc="Calibrating")
        temperature = calibrate(out["logits"], out["y"], hierarchy.R, hierarchical=loss != "ce")
    if best is not None and best.best_epoch is not None:
        logger.info("Kept the weights of epoch %d (%s = %.4f).", best.best_epoch, config.monitor, best.best_score)
    return FitResult(
        history={
            key: pd.DataFrame({key: [v for _, v in rows]}, index=pd.Index([e for e, _ in rows], name="epoch"))
            for key, rows in history.history.items()
        },
        best_epoch=best.best_epoch if best is not None else trainer.current_epoch - 1,
        temperature=temperature,
        optimizer=config.optimizer,
    )
