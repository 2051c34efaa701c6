"""Training: :meth:`~schce.HCEClassifier.train`."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from scvi import REGISTRY_KEYS
from tqdm.auto import tqdm

from schce._constants import MONITOR, SCALING_SAMPLE, SETUP_KEY
from schce._memory import release_free_memory
from schce.data._genes import GeneAligner
from schce.data._loader import make_loader, split_cells
from schce.nn._module import gene_moments
from schce.train import BestWeights, HCETrainingPlan, HistoryRecorder
from schce.train._callbacks import TrainingProgress
from schce.train._checkpoints import check_checkpoint_args, checkpoint_callbacks
from schce.train._config import DEFAULT_OPTIMIZER, LBFGS_L2
from schce.train._recipe import default_batch_size, get_recipe, matmul_precision, resolve_optimizer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_lightning_info():
    """Hide Lightning's start-up chatter (accelerator lines, tips) but keep its warnings."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        yield
    finally:
        rank_zero.setLevel(level)


class TrainingMixin:
    """Training on the registered AnnData or a datamodule, and the machinery :meth:`fine_tune` shares."""

    # ------------------------------------------------------------------ training
    def _label_codes(self) -> np.ndarray:
        """Every cell's label as an index into ``hierarchy.labels``."""
        setup = self.registry_[SETUP_KEY]
        mapping = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        # Unused categories of a categorical column were never mapped; no cell refers to them.
        code_map = self.hierarchy.label_index([setup["label_map"].get(str(v), "") for v in mapping])
        scvi_codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        return code_map[scvi_codes.astype(np.int64)]

    def train(
        self,
        max_epochs: int = 100,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        lr_gamma: float | None = None,
        optimizer: Literal["adamw", "lbfgs"] | None = None,
        validation_size: float = 0.1,
        test_size: float = 0.0,
        split_key: str | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        class_weights: Literal["balanced"] | None = "balanced",
        accelerator: str = "auto",
        devices: int | str = 1,
        seed: int = 0,
        num_workers: int = 0,
        enable_progress_bar: bool = True,
        adversarial_weight: float = 0.0,
        batch_mixing_weight: float = 0.0,
        ecs_weight: float = 0.0,
        ecs_threshold: float = 0.8,
        calibrate: bool = True,
        augment: bool | np.ndarray = False,
        checkpoint_dir: str | os.PathLike | None = None,
        ckpt_path: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int | None = None,
        datamodule: pl.LightningDataModule | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the classifier.

        A stratified ``validation_size`` fraction of the cells is held out; after every epoch the validation
        hierarchy-corrected macro F1 is computed, training stops early when it has not improved for
        ``early_stopping_patience`` epochs, and the weights of the best epoch are kept.

        Parameters
        ----------
        max_epochs
            Maximum number of passes over the training cells.
        batch_size
            Cells per step; default ``min(2048, max(32, n_train // 16))`` so small data still gets many steps.
        lr, weight_decay
            AdamW settings; default per backbone: 5e-4 / 0.01 (linear, MLP), 5e-3 / 0.05 (TabNet); with
            ``recipe="sctab"`` 5e-4 / 0.01, 2e-3 / 0.05, 5e-3 / 0.05 (linear / MLP / TabNet). With
            ``optimizer="lbfgs"``, ``weight_decay`` is the strength λ of the L2 penalty ``λ / 2 · ‖W‖²`` (default
            0.1) and ``lr`` is unused.
        lr_gamma
            Learning-rate factor applied after every epoch (StepLR); default 0.98, or 0.9 with ``recipe="sctab"``.
        optimizer
            ``"adamw"``: mini-batches. ``"lbfgs"``: full batch, for the linear backbone: every epoch is 20 L-BFGS
            iterations over all training cells on the L2-penalised loss, so the model is solved to convergence as a
            logistic regression is. Default (``None``): L-BFGS for ``backbone="linear"`` without a recipe, on
            in-memory data of at most 2**28 values (training cells × genes), one device, no augmentation or
            auxiliary terms; AdamW otherwise. See :doc:`/training`.
        validation_size
            Fraction of cells held out for validation (per label, or by whole groups with ``split_key``); ``0``
            trains on everything for ``max_epochs``.
        test_size
            Fraction of cells held out as a test set, never seen in training (``model.test_indices``).
        split_key
            ``obs`` column of donors, samples or batches: whole groups go to train, validation or test, as scTab
            splits by donor, so validation measures transfer to unseen groups. Default: random, per label.
        early_stopping, early_stopping_patience
            Stop when the validation metric stalls.
        class_weights
            ``"balanced"`` weighs label ``c`` by ``N / (K · n_c)`` in the training loss; ``None`` for none.
        accelerator, devices
            Passed to :class:`lightning.pytorch.Trainer` (``accelerator="auto"`` uses a GPU when there is one).
            ``devices=N, strategy="ddp"`` trains on N processes: each rank trains on its own shard of the training
            cells every epoch, every rank validates on all validation cells, and checkpoints and :meth:`save` write
            once (rank 0). Lightning re-runs the script for the other ranks, so run it as a script.
        seed
            Seeds weight initialisation, the split and the batch order: training is deterministic on CPU.
        num_workers
            DataLoader workers.
        enable_progress_bar
            Lightning's progress bar.
        adversarial_weight
            Weight of a batch discriminator trained behind gradient reversal on the embedding (scGPT's DAB), which
            pushes the embedding to forget the ``batch_key`` registered in :meth:`setup_anndata`. ``0`` = off.
        batch_mixing_weight
            Weight of :class:`~schce.losses.BatchMixingLoss` on the embedding (rewards neighbourhoods that mix
            batches). Needs ``batch_key``. ``0`` = off.
        ecs_weight, ecs_threshold
            Weight and threshold of scGPT's elastic cell similarity term on the embedding. ``0`` = off.
        calibrate
            Fit a temperature on the validation cells after training (temperature scaling); :meth:`predict` applies
            it. Needs ``validation_size > 0``.
        augment
            scTab's augmentation (training only): ``True`` builds the matrix with
            :func:`schce.data.augmentation_matrix` from the training cells, per label, as differences between the
            registered batches (or the ``split_key`` groups); or pass a matrix (rows × genes). Each normalised
            training input gets a random row added with a random sign, clamped to ``[0, 9]``.
        checkpoint_dir
            Directory for Lightning checkpoints: ``best.ckpt`` (highest validation hierarchy-corrected macro F1) and
            ``last.ckpt`` (end of every epoch, or every ``checkpoint_every_n_steps`` steps).
        ckpt_path
            Resume an interrupted run: ``"last"`` (``checkpoint_dir/last.ckpt``) or a checkpoint file. With the
            same data and arguments the result is identical to an uninterrupted run (weights, optimiser, scheduler,
            epoch and step, early stopping, best weights, history, data order and random state are restored).
        checkpoint_every_n_steps
            Also write ``last.ckpt`` every so many training steps, so a run can resume mid-epoch.
        datamodule
            Train on a :class:`~lightning.pytorch.LightningDataModule` instead of the registered AnnData, e.g.
            :class:`~schce.data.SCTabStoreDataModule` (see :meth:`from_sctab_store`): its train and validation
            loaders yield ``{"x", "y"}`` batches (``y`` indexing ``hierarchy.labels``; ``"batch"`` for batch terms).
            ``batch_size``, ``validation_size``, ``test_size``, ``split_key`` and ``num_workers`` are then the
            datamodule's; ``class_weights="balanced"`` uses its ``class_weights`` (the store's
            ``class_weights.npy``) when it has them.
        **trainer_kwargs
            Other :class:`lightning.pytorch.Trainer` arguments (e.g. ``precision="bf16-mixed"``, ``strategy``).
        """
        if self.adata is None and datamodule is None:
            raise RuntimeError(
                "This model has no registered AnnData to train on (it was loaded from disk); pass datamodule=."
            )
        if datamodule is not None and self.loss == "hce-aware":
            raise ValueError(
                "loss='hce-aware' reads label meanings from the training cells, which datamodule= training does not "
                "do yet; build the model with loss='hce' (the default of HCEClassifier.from_sctab_store)."
            )
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {max_epochs}.")
        if batch_size is not None and batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm needs two cells), got {batch_size}.")
        recipe = get_recipe(self.recipe, self.backbone) if getattr(self, "recipe", None) else None
        auxiliary = {"adversarial": adversarial_weight, "batch_mixing": batch_mixing_weight, "ecs": ecs_weight}
        augment_on = augment is True or not isinstance(augment, bool)
        optimizer = resolve_optimizer(
            optimizer,
            backbone=self.backbone,
            recipe=getattr(self, "recipe", None),
            n_values=None if datamodule is not None else self.adata.n_obs * len(self.genes),
            devices=devices,
            batch_size=batch_size,
            stochastic=[f"{k}_weight" for k, w in auxiliary.items() if w] + ["augment"] * augment_on,
            gradient_clip_val=trainer_kwargs.get("gradient_clip_val"),
        )
        default_lr, default_wd = DEFAULT_OPTIMIZER.get(self.backbone, DEFAULT_OPTIMIZER["mlp"])
        if recipe is not None:
            default_lr, default_wd = recipe.lr, recipe.weight_decay
        if optimizer == "lbfgs":
            default_wd = LBFGS_L2
        lr = default_lr if lr is None else lr
        weight_decay = default_wd if weight_decay is None else weight_decay
        lr_gamma = (recipe.lr_gamma if recipe else 0.98) if lr_gamma is None else lr_gamma
        checkpoint_dir, resume_from = check_checkpoint_args(checkpoint_dir, ckpt_path, checkpoint_every_n_steps)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}.")
        if class_weights not in ("balanced", None):
            raise ValueError(f"class_weights must be 'balanced' or None, got {class_weights!r}.")
        if datamodule is None:
            n_batches = int(self.summary_stats["n_batch"])
        else:
            n_batches = int(getattr(datamodule, "n_batches", None) or 1)
        no_batch_key = datamodule is None and self.registry_["setup_args"]["batch_key"] is None
        if (adversarial_weight or batch_mixing_weight) and no_batch_key:
            raise ValueError(
                "adversarial_weight and batch_mixing_weight act on batches, but no batch_key was registered: "
                "call HCEClassifier.setup_anndata(adata, ..., batch_key='batch') first."
            )
        if (adversarial_weight or batch_mixing_weight) and n_batches < 2:
            raise ValueError(f"The registered batch_key has {n_batches} batch; batch terms need at least two.")
        groups = None
        if split_key is not None and datamodule is None:
            if split_key not in self.adata.obs.columns:
                raise KeyError(
                    f"split_key={split_key!r} is not a column of adata.obs. Available: {list(self.adata.obs.columns)}."
                )
            groups = self.adata.obs[split_key].astype(str).to_numpy()
        if isinstance(augment, bool):
            if augment and datamodule is not None:
                raise ValueError(
                    "augment=True builds the matrix from registered AnnData cells; with datamodule= pass a ready "
                    "matrix (e.g. np.load('<store>/augmentations.npy'))."
                )
            if augment and self.registry_["setup_args"]["batch_key"] is None and groups is None:
                raise ValueError(
                    "augment=True learns batch shifts from differences between batches: register a batch_key in "
                    "setup_anndata, pass split_key, or pass a ready augmentation matrix."
                )
        else:
            augment = np.asarray(augment, dtype=np.float32)
            if augment.ndim != 2 or augment.shape[1] != len(self.genes) or not np.isfinite(augment).all():
                raise ValueError(
                    f"augment must be True/False or a finite (rows, {len(self.genes)} genes) matrix, got shape "
                    f"{augment.shape}."
                )
        pl.seed_everything(seed, workers=True, verbose=False)
        if not self.is_trained_:
            # Re-initialise under the seed so results do not depend on what ran before construction.
            for m in self.module.modules():
                if m is not self.module and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if datamodule is None:
            X = self._registered_matrix()
            codes = self._label_codes()
            train_idx, val_idx, test_idx = split_cells(codes, validation_size, test_size, seed, groups)
            batches = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel()
            sources = batches if self.registry_["setup_args"]["batch_key"] is not None else None
            if optimizer == "lbfgs":
                batch_size = len(train_idx)
            elif batch_size is None:
                batch_size = default_batch_size(len(train_idx), recipe.max_batch_size if recipe else 2048)
            if augment is True:
                from schce.data import augmentation_matrix

                source = batches if self.registry_["setup_args"]["batch_key"] is not None else groups
                augment = augmentation_matrix(
                    X, codes, source, normalize=self.registry_[SETUP_KEY]["normalize"], seed=seed, rows=train_idx
                )
                if not len(augment):
                    raise ValueError("augment=True found no label in two batches of the training cells to learn from.")
                logger.info("Augmenting training inputs with %d rows.", len(augment))
        else:
            X = codes = train_idx = val_idx = test_idx = batches = sources = None
        if self.standardize and not self.is_trained_:
            self._fit_input_scaling(X, train_idx, datamodule)
        # L-BFGS runs unclipped (a user's clipping value already made the automatic choice AdamW).
        clip = None if optimizer == "lbfgs" else recipe.gradient_clip_val if recipe else 1.0
        trainer_kwargs.setdefault("gradient_clip_val", clip)
        self._fit(
            X,
            codes,
            train_idx,
            val_idx,
            normalize=self.registry_[SETUP_KEY]["normalize"],
            batches=batches,
            n_batches=n_batches,
            sources=sources,
            datamodule=datamodule,
            augmentations=augment if isinstance(augment, np.ndarray) else None,
            checkpoint_dir=checkpoint_dir,
            resume_from=resume_from,
            checkpoint_every_n_steps=checkpoint_every_n_steps,
            auxiliary=auxiliary,
            ecs_threshold=ecs_threshold,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            lr_gamma=lr_gamma,
            optimizer=optimizer,
            early_stopping=early_stopping,
            early_stopping_patience=early_stopping_patience,
            class_weights=class_weights,
            accelerator=accelerator,
            devices=devices,
            seed=seed,
            num_workers=num_workers,
            enable_progress_bar=enable_progress_bar,
            calibrate=calibrate,
            **trainer_kwargs,
        )
        self.train_indices_, self.validation_indices_, self.test_indices_ = train_idx, val_idx, test_idx

    def _fit_input_scaling(self, X, train_idx: np.ndarray | None, datamodule) -> None:
        """Set the module's per-gene standardisation from the training cells (a sample of an atlas datamodule)."""
        if datamodule is None:
            loader, max_cells = make_loader(X, train_idx, 4096), None
        else:
            from schce.model._store import scaling_loader

            loader, max_cells = scaling_loader(datamodule), SCALING_SAMPLE
        n_batches = len(loader) if max_cells is None else None
        iterator = iter(loader)
        try:
            # A bar only when the pass is long enough to wait for.
            batches = tqdm(
                iterator,
                desc="Gene scaling",
                unit="batch",
                leave=False,
                total=n_batches,
                disable=n_batches is not None and n_batches < 20,
            )
            mean, std, n = gene_moments(batches, self.registry_[SETUP_KEY]["normalize"], max_cells)
        finally:
            # Stop this pass's loader workers now (it ends early on an atlas), before training starts its own.
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self.module.set_input_scaling(mean, std)
        logger.info("Standardising %d genes with the mean and scale of %d training cells.", len(mean), n)

    def _fit_targets(
        self,
        codes: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        sources: np.ndarray | None,
        class_weights: str | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Class weights, and the annotation-aware target masks with each row's mask index."""
        weights = None
        if class_weights == "balanced":
            counts = np.bincount(codes[train_idx], minlength=self.hierarchy.n_labels).astype(np.float64)
            present = counts > 0
            weights = np.zeros_like(counts)
            weights[present] = len(train_idx) / (present.sum() * counts[present])
        target_masks = targets = None
        if self.loss == "hce-aware":
            # What a label means is read from the cells the model learns from (training and validation).
            seen = np.concatenate([train_idx, val_idx])
            seen_sources = sources[seen] if sources is not None else None
            target_masks, seen_rows = self.hierarchy.annotation_targets(codes[seen], seen_sources, self.label_semantics)
            targets = np.full(len(codes), -1, dtype=np.int64)
            targets[seen] = seen_rows
            logger.info(
                "Annotation-aware targets (%s): %d distinct acceptable-label sets.",
                self.label_semantics,
                len(target_masks),
            )
        return weights, target_masks, targets

    def _fit(
        self,
        X,
        codes: np.ndarray,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        normalize: bool,
        max_epochs: int,
        batch_size: int | None,
        lr: float,
        weight_decay: float,
        lr_gamma: float,
        early_stopping: bool,
        early_stopping_patience: int,
        class_weights: str | None,
        accelerator: str,
        devices: int | str,
        seed: int,
        num_workers: int,
        enable_progress_bar: bool,
        calibrate: bool,
        aligner: GeneAligner | None = None,
        batches: np.ndarray | None = None,
        n_batches: int = 1,
        sources: np.ndarray | None = None,
        auxiliary: dict[str, float] | None = None,
        ecs_threshold: float = 0.8,
        callbacks: Sequence[pl.Callback] = (),
        datamodule=None,
        augmentations: np.ndarray | None = None,
        checkpoint_dir: Path | None = None,
        resume_from: str | None = None,
        checkpoint_every_n_steps: int | None = None,
        optimizer: str = "adamw",
        **trainer_kwargs,
    ) -> None:
        """Train ``self.module`` on rows of ``X``, keep the best validation epoch, calibrate.

        The machinery shared by :meth:`train` and :meth:`fine_tune`; ``codes`` index ``self.hierarchy.labels``,
        ``sources`` are the rows' annotation sources for ``loss="hce-aware"`` (``None``: one source). With a
        ``datamodule`` its loaders replace ``X`` / ``codes`` / the indices (``None`` then).
        """
        if datamodule is not None:
            from schce.model import _store as _store_model

            _store_model.check_datamodule(datamodule, self.genes, self.hierarchy.n_labels)
            weights = _store_model.datamodule_class_weights(datamodule, class_weights, self.hierarchy.n_labels)
            n_train, n_val, batch_size = _store_model.datamodule_sizes(datamodule)
            target_masks = targets = None
        else:
            n_train, n_val = len(train_idx), len(val_idx)
            batch_size = default_batch_size(n_train) if batch_size is None else batch_size
            weights, target_masks, targets = self._fit_targets(codes, train_idx, val_idx, sources, class_weights)
        plan = HCETrainingPlan(
            self.module,
            self.hierarchy.R,
            loss=self.loss,
            target_masks=target_masks,
            class_weights=weights,
            normalize=normalize,
            lr=lr,
            weight_decay=weight_decay,
            lr_gamma=lr_gamma,
            hce_form=self.hce_form,
            auxiliary=auxiliary,
            n_batches=n_batches,
            ecs_threshold=ecs_threshold,
            augmentations=augmentations,
            optimizer=optimizer,
        )
        if datamodule is None:
            train_dl = make_loader(
                X,
                train_idx,
                batch_size,
                codes,
                shuffle=True,
                aligner=aligner,
                seed=seed,
                num_workers=num_workers,
                batches=batches,
                targets=targets,
            )
            val_dl = None
            if len(val_idx):
                val_dl = make_loader(X, val_idx, 4096, codes, aligner=aligner, num_workers=num_workers, targets=targets)
            fit_data = {"train_dataloaders": train_dl, "val_dataloaders": val_dl}
        else:
            train_dl, val_dl = datamodule.train_dataloader(), datamodule.val_dataloader() if n_val else None
            fit_data = {"datamodule": datamodule}
        history = HistoryRecorder()
        user_callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        callbacks = [history, *callbacks]
        if datamodule is None:
            fingerprint = {"seed": seed, "n_train": n_train, "n_validation": n_val, "batch_size": batch_size}
            callbacks.insert(0, TrainingProgress(train_dl.sampler, fingerprint))
        # L-BFGS solves a convex problem: its answer is the converged optimum, not the iterate that scored best on
        # the validation cells, and it stops when the training loss stops falling.
        best = BestWeights(MONITOR) if val_dl is not None and optimizer != "lbfgs" else None
        if best is not None:
            callbacks.append(best)
            if early_stopping:
                callbacks.append(
                    pl.callbacks.EarlyStopping(MONITOR, mode="max", patience=early_stopping_patience, check_finite=True)
                )
        elif optimizer == "lbfgs" and early_stopping:
            callbacks.append(pl.callbacks.EarlyStopping("train_loss", mode="min", min_delta=1e-6, patience=1))
        callbacks += user_callbacks
        if checkpoint_dir is not None:
            monitor = MONITOR if val_dl is not None else None
            callbacks += checkpoint_callbacks(checkpoint_dir, monitor, checkpoint_every_n_steps)
        trainer_kwargs.setdefault("gradient_clip_val", 1.0)
        with _quiet_lightning_info():
            trainer = pl.Trainer(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                logger=False,
                # Our sampler shards the training cells itself (and keeps its order resumable).
                use_distributed_sampler=False,
                enable_checkpointing=checkpoint_dir is not None,
                enable_model_summary=False,
                enable_progress_bar=enable_progress_bar,
                num_sanity_val_steps=0,
                callbacks=callbacks,
                log_every_n_steps=max(1, min(50, len(train_dl))),
                **trainer_kwargs,
            )
        logger.info(
            "Training %s with %s on %d cells (%d for validation), batch size %d, up to %d epochs.",
            self.loss.upper(),
            "full-batch L-BFGS" if optimizer == "lbfgs" else "AdamW",
            n_train,
            n_val,
            batch_size,
            max_epochs,
        )
        self.module.train()  # a trained model is left in eval mode; Lightning keeps the mode it finds
        with _quiet_lightning_info(), matmul_precision("high"), warnings.catch_warnings():
            # TrainingProgress restores the data order mid-epoch, which Lightning cannot see from the loader.
            warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
            if resume_from is not None:
                warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
            release_free_memory()  # before the loader workers fork from this process
            trainer.fit(plan, ckpt_path=resume_from, **fit_data)
        self.module.eval()
        self.history_ = {
            key: pd.DataFrame({key: [v for _, v in rows]}, index=pd.Index([e for e, _ in rows], name="epoch"))
            for key, rows in history.history.items()
        }
        self.best_epoch_ = best.best_epoch if best is not None else trainer.current_epoch - 1
        self.optimizer_ = optimizer
        self.is_trained_ = True
        self.temperature_ = 1.0
        if calibrate and n_val:
            if datamodule is None:
                val_logits, val_codes = self._run(X, val_idx, normalize, aligner, 4096)[0], codes[val_idx]
            else:
                from schce.model._store import loader_outputs

                out = loader_outputs(self.module, datamodule.val_dataloader(), normalize, desc="Calibrating")
                val_logits, val_codes = out["logits"], out["y"]
            self._calibrate(val_logits, val_codes)
        if best is not None and best.best_epoch is not None:
            logger.info("Kept the weights of epoch %d (%s = %.4f).", best.best_epoch, MONITOR, best.best_score)

    def _calibrate(self, logits: np.ndarray, targets: np.ndarray) -> None:
        """Temperature scaling on held-out logits; logs the expected calibration error before and after."""
        from schce.metrics import correct_codes, expected_calibration_error
        from schce.train import fit_temperature

        R = self.hierarchy.R
        self.temperature_ = fit_temperature(logits, targets, None if self.loss == "ce" else R)

        def ece(t: float) -> float:
            probs = torch.softmax(torch.from_numpy(logits).double() / t, dim=1).numpy()
            pred = probs.argmax(1)
            correct = correct_codes(targets, pred, R) == targets
            return expected_calibration_error(probs.max(1), correct)

        logger.info(
            "Calibrated on %d validation cells: temperature %.3f, expected calibration error %.4f -> %.4f.",
            len(targets),
            self.temperature_,
            ece(1.0),
            ece(self.temperature_),
        )
