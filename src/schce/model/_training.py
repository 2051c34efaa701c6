"""Training: :meth:`~schce.HCEClassifier.train` wires a data module, a ``TrainConfig`` and the runner."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
from scvi import REGISTRY_KEYS

from schce._checks import check_checkpoint_file, check_registration_current
from schce.data._anndata import AnnDataModule
from schce.data._augmentation import (
    augmentation_matrix,
    published_augmentation_candidates,
    published_augmentation_matrix,
)
from schce.data._loader import split_cells
from schce.data._protocol import check_datamodule, datamodule_macro_weights
from schce.train._config import MONITORS, TrainConfig
from schce.train._recipe import get_recipe
from schce.train._runner import FitResult, fit, fit_input_scaling

logger = logging.getLogger(__name__)


class TrainingMixin:
    """Training on the registered AnnData or a data module; :meth:`fine_tune` shares :meth:`_run_fit`."""

    def _label_codes(self) -> np.ndarray:
        """Every cell's label as an index into ``hierarchy.labels``."""
        label_map = self.setup_state.label_map
        mapping = self.adata_manager.get_state_registry(REGISTRY_KEYS.LABELS_KEY).categorical_mapping
        # Unused categories of a categorical column were never mapped; no cell refers to them.
        code_map = self.hierarchy.label_index([label_map.get(str(v), "") for v in mapping])
        scvi_codes = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        return code_map[scvi_codes.astype(np.int64)]

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        lr_gamma: float | None = None,
        optimizer: Literal["adamw", "lbfgs"] | None = None,
        validation_size: float | None = None,
        test_size: float | None = None,
        split_key: str | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        early_stopping_monitor: Literal["f1", "loss", "weighted_loss", "macro_loss"] | None = None,
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
        ema_decay: float | None = None,
        label_smoothing: float = 0.0,
        calibrate: bool = True,
        augment: bool | np.ndarray | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        ckpt_path: str | os.PathLike | None = None,
        checkpoint_every_n_steps: int | None = None,
        datamodule: pl.LightningDataModule | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the classifier.

        A stratified ``validation_size`` fraction of the cells is held out; after every epoch the validation loss
        (class-weighted as the training loss is) and the hierarchy-corrected macro F1 are computed, training stops
        early when the loss has not improved for ``early_stopping_patience`` epochs, and the weights of the best
        epoch are kept (``early_stopping_monitor`` chooses what is followed).

        Parameters
        ----------
        max_epochs
            Maximum number of passes over the training cells; default 100, or 50 with ``recipe="sctab"``.
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
            trains on everything for ``max_epochs``. Default 0.1, or 0.15 with ``recipe="sctab"`` and ``split_key``
            (the paper's donor split, 70 / 15 / 15).
        test_size
            Fraction of cells held out as a test set, never seen in training (``model.test_indices``). Default 0, or
            0.15 with ``recipe="sctab"`` and ``split_key``.
        split_key
            ``obs`` column of donors, samples or batches: whole groups go to train, validation or test, as scTab
            splits by donor, so validation measures transfer to unseen groups. Default: random, per label.
        early_stopping, early_stopping_patience
            Stop when the monitored validation quantity stalls (``early_stopping_monitor``). Its ``"f1"`` is the
            hierarchy-corrected macro F1 over the true labels, or with ``recipe="sctab"`` the paper's (over the
            labels true or predicted, ``validation_paper_macro_f1``).
        early_stopping_monitor
            What early stopping, the kept best epoch and ``best.ckpt`` follow: ``"weighted_loss"`` (the validation
            loss weighted by ``class_weights`` as the training loss is, lowest), ``"loss"`` (unweighted, lowest),
            ``"macro_loss"`` (the mean over labels of each label's mean validation loss, lowest: every label counts
            alike, whatever its training count; not with a census module) or ``"f1"`` (the validation metric named
            above, highest). Default (``None``): ``"weighted_loss"``, or ``"loss"`` with ``class_weights=None``, and
            ``"f1"`` with ``recipe="sctab"`` (the published recipe). On small references the loss of every validation
            cell picks a better epoch than the macro F1 of a few of them (see :doc:`/method`).
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
        ema_decay
            Average the weights along training: an exponential moving average with this factor per optimiser step
            (e.g. ``0.9`` weighs about the last 10 steps; bias-corrected, so it starts at the first step's weights).
            Validation, the kept best epoch, calibration and prediction use the averaged weights; checkpoints keep
            the average, so a resumed run continues it. AdamW only. ``None`` = off. See :doc:`/training`.
        label_smoothing
            ε of label smoothing in the training loss: ``(1 − ε) · loss + ε · mean_i(−log P_i)`` over the labels,
            ``P_i`` a label's subtree probability with the hierarchical losses (its own with ``"ce"``). ``0`` = off.
        calibrate
            Fit a temperature on the validation cells after training (temperature scaling); :meth:`predict` applies
            it. Needs ``validation_size > 0``.
        augment
            scTab's augmentation (training only): ``True`` builds the matrix with
            :func:`schce.data.augmentation_matrix` from the training cells, per label, as differences between the
            registered batches (or the ``split_key`` groups); or pass a matrix (rows × genes). Each normalised
            training input gets a random row added with a random sign, clamped to ``[0, 9]``. Default (``None``):
            off, except with ``recipe="sctab"`` for the MLP and TabNet, which use the datamodule's store
            ``augmentations.npy`` or, on AnnData, :func:`schce.data.published_augmentation_matrix` over the training
            cells grouped by ``batch_key`` (else ``split_key``); see :doc:`/training`.
        checkpoint_dir
            Directory for Lightning checkpoints: ``best.ckpt`` (the best epoch by ``early_stopping_monitor``) and
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
        auxiliary = {"adversarial": adversarial_weight, "batch_mixing": batch_mixing_weight, "ecs": ecs_weight}
        config = TrainConfig.from_arguments(locals(), auxiliary=auxiliary)
        check_checkpoint_file(config.resume_from)  # an empty or truncated file fails here, naming it
        settings = get_recipe(self.recipe, self.backbone) if self.recipe else None
        recipe_augment = augment is None and settings is not None and settings.augment
        augment_on = recipe_augment or augment is True or not isinstance(augment, bool | None)
        n_values = None if datamodule is not None else self.adata.n_obs * len(self.genes)
        config = config.resolve(self.backbone, self.recipe, n_values, augment_on)
        registered = datamodule is None
        if registered:
            datamodule = self._anndata_module(config, split_key, validation_size, test_size, num_workers)
        # Every data path answers the same questions: the contract, the options it serves, label meanings.
        check_datamodule(datamodule, len(self.genes), self.hierarchy.n_labels)
        batch_terms = bool(config.auxiliary["adversarial"] or config.auxiliary["batch_mixing"])
        datamodule.check_train_options(batch_terms=batch_terms, augment=augment is True)
        macro = datamodule_macro_weights(datamodule) if config.monitor == MONITORS["macro_loss"] else None  # early
        augment = _check_augment(bool(augment) if augment is None else augment, len(self.genes))
        if self.loss == "hce-aware" and not registered:
            # asked now, so a module that cannot read label meanings fails before work (fit asks the others)
            datamodule.annotation_targets(self.hierarchy, self.label_semantics)
        pl.seed_everything(seed, workers=True, verbose=False)
        if not self.is_trained_:
            # Re-initialise under the seed so results do not depend on what ran before construction.
            for m in self.module.modules():
                if m is not self.module and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        if augment is True:
            augment = self._augmentation_matrix(datamodule, seed)
        elif recipe_augment:
            augment = (
                self._published_augmentation(datamodule, seed)
                if isinstance(datamodule, AnnDataModule)
                else _store_augmentation(datamodule, len(self.genes))
            )
        normalize = self.setup_state.normalize
        if self.standardize and not self.is_trained_:
            fit_input_scaling(self.module, datamodule, normalize)
        augmentations = augment if isinstance(augment, np.ndarray) else None
        self._run_fit(datamodule, config, normalize, augmentations=augmentations, validation_weights=macro)
        rows = datamodule.rows if registered else {}
        self.train_indices_, self.validation_indices_ = rows.get("train"), rows.get("val")
        self.test_indices_ = rows.get("test")

    def _anndata_module(
        self,
        config: TrainConfig,
        split_key: str | None,
        validation_size: float | None,
        test_size: float | None,
        num_workers: int,
    ) -> AnnDataModule:
        """The registered cells as a data module: split by label (or by ``split_key`` groups), batch size resolved."""
        check_registration_current(self)  # a later setup_anndata or edited labels would mislabel the outputs
        groups = None
        if split_key is not None:
            if split_key not in self.adata.obs.columns:
                raise KeyError(
                    f"split_key={split_key!r} is not a column of adata.obs. Available: {list(self.adata.obs.columns)}."
                )
            groups = self.adata.obs[split_key].astype(str).to_numpy()
        validation_size, test_size = _split_sizes(self.recipe, groups, validation_size, test_size)
        codes = self._label_codes()
        train_idx, val_idx, test_idx = split_cells(codes, validation_size, test_size, config.seed, groups)
        batches = np.asarray(self.adata_manager.get_from_registry(REGISTRY_KEYS.BATCH_KEY)).ravel()
        has_batch_key = self.registry_["setup_args"]["batch_key"] is not None
        return AnnDataModule(
            self._registered_matrix(),
            codes,
            self.hierarchy.labels,
            train_idx,
            val_idx,
            test_idx,
            batch_size=config.batch_size_for(len(train_idx), self.recipe, self.backbone),
            seed=config.seed,
            num_workers=num_workers,
            batches=batches,
            n_batches=int(self.summary_stats["n_batch"]),
            sources=batches if has_batch_key else None,
            obs=self._rna(self.adata).obs,
            groups=groups,
        )

    def _augmentation_matrix(self, datamodule: AnnDataModule, seed: int) -> np.ndarray:
        """The scTab augmentation learnt from the training cells: per-label differences between batches (or groups)."""
        augment = augmentation_matrix(
            datamodule.X,
            datamodule.codes,
            datamodule.shift_sources(),
            normalize=self.setup_state.normalize,
            seed=seed,
            rows=datamodule.rows["train"],
        )
        if not len(augment):
            raise ValueError("augment=True found no label in two batches of the training cells to learn from.")
        logger.info("Augmenting training inputs with %d rows.", len(augment))
        return augment

    def _published_augmentation(self, datamodule: AnnDataModule, seed: int) -> np.ndarray | None:
        """The recipe's augmentation on AnnData: scTab's construction over the training cells, by batch (or group).

        scTab's KMeans selection (clusters above 2,000 rows, 5,000 rows drawn) needs an atlas; where the training
        cells give too few candidate rows for it, all candidate rows are used.
        """
        source = datamodule.shift_sources()
        if source is None:
            warnings.warn(
                "recipe='sctab' augments the MLP and TabNet with shifts between samples, but no batch_key was "
                "registered and no split_key given: training without augmentation. Register a batch_key (scTab: "
                "tech_sample), pass split_key, or pass augment=<matrix>.",
                UserWarning,
                stacklevel=3,
            )
            return None
        train = datamodule.rows["train"]
        args = (datamodule.X[train], datamodule.codes[train], np.asarray(source)[train])
        normalize = self.setup_state.normalize
        try:
            return published_augmentation_matrix(*args, normalize=normalize, seed=seed)
        except ValueError as err:
            if "candidate rows" not in str(err):
                warnings.warn(f"recipe='sctab': training without augmentation: {err}", UserWarning, stacklevel=3)
                return None
        candidates, _ = published_augmentation_candidates(*args, normalize=normalize, seed=seed)
        logger.info(
            "Too few candidate rows (%d) for scTab's KMeans selection of 5,000; augmenting with all of them.",
            len(candidates),
        )
        return candidates

    def _run_fit(self, datamodule, config: TrainConfig, normalize: bool, **kwargs) -> FitResult:
        """Run :func:`schce.train.fit` on ``self.module`` and record the run on the model."""
        result = fit(
            self.module,
            self.hierarchy,
            datamodule,
            config,
            n_genes=len(self.genes),
            loss=self.loss,
            hce_form=self.hce_form,
            label_semantics=self.label_semantics,
            normalize=normalize,
            **kwargs,
        )
        self.history_, self.best_epoch_, self.optimizer_ = result.history, result.best_epoch, result.optimizer
        self.is_trained_ = True
        self.temperature_ = result.temperature
        return result


def _check_augment(augment, n_genes: int):
    """``augment`` checked: ``True`` / ``False``, or a finite (rows × genes) float32 matrix."""
    if isinstance(augment, bool):
        return augment
    augment = np.asarray(augment, dtype=np.float32)
    if augment.ndim != 2 or augment.shape[1] != n_genes or not np.isfinite(augment).all():
        raise ValueError(
            f"augment must be True/False or a finite (rows, {n_genes} genes) matrix, got shape {augment.shape}."
        )
    return augment


def _split_sizes(recipe: str | None, groups, validation_size: float | None, test_size: float | None):
    """``(validation_size, test_size)``: as given, else the paper's 15 / 15 (donor split) or 0.1 / 0."""
    donor_split = recipe is not None and groups is not None
    validation_size = (0.15 if donor_split else 0.1) if validation_size is None else validation_size
    test_size = (0.15 if donor_split else 0.0) if test_size is None else test_size
    return validation_size, test_size


def _store_augmentation(datamodule, n_genes: int) -> np.ndarray | None:
    """The published ``augmentations.npy`` of a datamodule's store, or ``None`` (with a warning) without one."""
    path = getattr(datamodule, "path", None)
    file = None if path is None else Path(path) / "augmentations.npy"
    if file is None or not file.is_file():
        warnings.warn(
            f"recipe='sctab' augments the MLP and TabNet with the store's augmentations.npy, but "
            f"{file or type(datamodule).__name__ + ' has no store path'} is missing: training without augmentation. "
            f"Pass augment=<matrix> (e.g. schce.data.published_augmentation_matrix(...)) to augment.",
            UserWarning,
            stacklevel=3,
        )
        return None
    matrix = np.load(file).astype(np.float32, copy=False)
    if matrix.ndim != 2 or matrix.shape[1] != n_genes or not np.isfinite(matrix).all():
        raise ValueError(f"{file} must be a finite (rows, {n_genes} genes) matrix, got shape {matrix.shape}.")
    logger.info("Augmenting training inputs with the %d rows of %s.", len(matrix), file)
    return matrix
