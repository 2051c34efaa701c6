"""Training: :meth:`~schce.HCEClassifier.train` wires a data module, a ``TrainConfig`` and the runner."""

from __future__ import annotations

import logging
import os
from typing import Literal

import lightning.pytorch as pl
import numpy as np
from scvi import REGISTRY_KEYS

from schce._checks import check_checkpoint_file, check_registration_current
from schce.data._anndata import AnnDataModule
from schce.data._augmentation import augmentation_matrix
from schce.data._loader import split_cells
from schce.data._protocol import check_datamodule
from schce.train._config import TrainConfig
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
        if datamodule is None:
            check_registration_current(self)  # a later setup_anndata or edited labels would mislabel the outputs
        auxiliary = {"adversarial": adversarial_weight, "batch_mixing": batch_mixing_weight, "ecs": ecs_weight}
        config = TrainConfig.from_arguments(locals(), auxiliary=auxiliary)
        check_checkpoint_file(config.resume_from)  # an empty or truncated file fails here, naming it
        augment_on = augment is True or not isinstance(augment, bool)
        n_values = None if datamodule is not None else self.adata.n_obs * len(self.genes)
        config = config.resolve(self.backbone, self.recipe, n_values, augment_on)
        if datamodule is not None:
            check_datamodule(datamodule, len(self.genes), self.hierarchy.n_labels)
            if self.loss == "hce-aware":  # asked now, so a module that cannot read label meanings fails before work
                datamodule.annotation_targets(self.hierarchy, self.label_semantics)
        groups = self._check_batch_terms(config, datamodule, split_key, augment)
        augment = self._check_augment(augment, datamodule, groups)
        pl.seed_everything(seed, workers=True, verbose=False)
        if not self.is_trained_:
            # Re-initialise under the seed so results do not depend on what ran before construction.
            for m in self.module.modules():
                if m is not self.module and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        registered = datamodule is None
        if registered:
            datamodule = self._anndata_module(config, validation_size, test_size, groups, num_workers)
            if augment is True:
                augment = self._augmentation_matrix(datamodule, groups, seed)
        normalize = self.setup_state.normalize
        if self.standardize and not self.is_trained_:
            fit_input_scaling(self.module, datamodule, normalize)
        self._run_fit(datamodule, config, normalize, augmentations=augment if isinstance(augment, np.ndarray) else None)
        rows = datamodule.rows if registered else {}
        self.train_indices_, self.validation_indices_ = rows.get("train"), rows.get("val")
        self.test_indices_ = rows.get("test")

    def _check_batch_terms(self, config: TrainConfig, datamodule, split_key: str | None, augment) -> np.ndarray | None:
        """Check the batch terms and the split column against the data; the split groups (``None``: by label)."""
        if datamodule is None:
            n_batches = int(self.summary_stats["n_batch"])
        else:
            n_batches = datamodule.n_batches
        batch_terms = config.auxiliary["adversarial"] or config.auxiliary["batch_mixing"]
        no_batch_key = datamodule is None and self.registry_["setup_args"]["batch_key"] is None
        if batch_terms and no_batch_key:
            raise ValueError(
                "adversarial_weight and batch_mixing_weight act on batches, but no batch_key was registered: "
                "call HCEClassifier.setup_anndata(adata, ..., batch_key='batch') first."
            )
        if batch_terms and n_batches < 2:
            raise ValueError(f"The registered batch_key has {n_batches} batch; batch terms need at least two.")
        if split_key is None or datamodule is not None:
            return None
        if split_key not in self.adata.obs.columns:
            raise KeyError(
                f"split_key={split_key!r} is not a column of adata.obs. Available: {list(self.adata.obs.columns)}."
            )
        return self.adata.obs[split_key].astype(str).to_numpy()

    def _check_augment(self, augment, datamodule, groups: np.ndarray | None):
        """``augment`` checked: ``True`` / ``False``, or a finite (rows × genes) float32 matrix."""
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
            return augment
        augment = np.asarray(augment, dtype=np.float32)
        if augment.ndim != 2 or augment.shape[1] != len(self.genes) or not np.isfinite(augment).all():
            raise ValueError(
                f"augment must be True/False or a finite (rows, {len(self.genes)} genes) matrix, got shape "
                f"{augment.shape}."
            )
        return augment

    def _anndata_module(
        self, config: TrainConfig, validation_size: float, test_size: float, groups, num_workers: int
    ) -> AnnDataModule:
        """The registered cells as a data module: split by label (or by ``groups``), batch size resolved."""
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
        )

    def _augmentation_matrix(self, datamodule: AnnDataModule, groups, seed: int) -> np.ndarray:
        """The scTab augmentation learnt from the training cells: per-label differences between batches (or groups)."""
        source = datamodule.batches if self.registry_["setup_args"]["batch_key"] is not None else groups
        augment = augmentation_matrix(
            datamodule.X,
            datamodule.codes,
            source,
            normalize=self.setup_state.normalize,
            seed=seed,
            rows=datamodule.rows["train"],
        )
        if not len(augment):
            raise ValueError("augment=True found no label in two batches of the training cells to learn from.")
        logger.info("Augmenting training inputs with %d rows.", len(augment))
        return augment

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
