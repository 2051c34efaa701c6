"""The user-facing classifier: :class:`HCEClassifier`."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import rich
import rich.pretty  # scvi-tools' view_registry uses rich.pretty without importing it
import scipy.sparse as sp
import torch
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalObsField,
    LayerField,
    MuDataCategoricalObsField,
    MuDataLayerField,
)
from scvi.model.base import BaseModelClass
from tqdm.auto import tqdm

from schce import _io
from schce._memory import release_free_memory
from schce._output import prediction_frame, write_outputs
from schce.data._expression import check_expression, get_matrix, resolve_normalize
from schce.data._genes import GeneAligner, gene_id_type, strip_ensembl_version
from schce.data._loader import make_loader, split_cells
from schce.evaluation import DEFAULT_GROUPBY, EvaluationResult, evaluate_predictions
from schce.hierarchy import LABEL_SEMANTICS, Hierarchy
from schce.nn import HCEModule, extend_head, make_backbone, output_layer
from schce.nn._module import gene_moments
from schce.ontology import load_cell_ontology
from schce.train import LOSSES, BestWeights, FrozenModules, HCETrainingPlan, HistoryRecorder
from schce.train._callbacks import TrainingProgress
from schce.train._checkpoints import check_checkpoint_args, checkpoint_callbacks
from schce.train._recipe import default_batch_size, get_recipe, matmul_precision, resolve_optimizer

logger = logging.getLogger(__name__)

_SETUP_KEY = "schce"  # our section of the scvi-tools registry
MONITOR = "validation_corrected_macro_f1"
# Classifier defaults per backbone, chosen on held-out batches of real PBMCs (leave-one-batch-out): a wider,
# shallower MLP than scTab's 8 × 128 generalises better across batches at small and medium scale.
# Cells an atlas datamodule's shuffled training loader contributes to the gene scaling (plenty for a mean and a std).
SCALING_SAMPLE = 200_000
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


class HCEClassifier(BaseModelClass):
    """Cell-type classifier over Cell Ontology labels, trained with the hierarchical cross-entropy loss.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        A saved registry (used by :meth:`load`; leave ``None``).
    backbone
        ``"mlp"``, ``"linear"`` (a logistic regression, fitted by full-batch L-BFGS; see :meth:`train`) or
        ``"tabnet"``.
    recipe
        ``None``: the package defaults (tuned on held-out batches of real PBMCs); ``"sctab"``: the published scTab /
        HCE-paper recipe, i.e. scTab's exact architecture and, in :meth:`train`, its AdamW settings, StepLR(0.9) and
        batch 2048 (see :data:`schce.train.RECIPES`). Explicit arguments override either.
    loss
        ``"hce-aware"`` (default): hierarchical cross-entropy whose acceptable labels follow what each annotation
        can mean (see ``label_semantics``); ``"hce"``: plain hierarchical cross-entropy (a label's probability
        includes all its descendants'); ``"ce"``: flat cross-entropy. See :doc:`/method`.
    label_semantics
        For ``loss="hce-aware"``: ``"auto"`` reads a label as its subtree minus the subtrees of the other labels
        that the same annotation source (the ``batch_key`` of :meth:`setup_anndata`, or the whole training set
        when none) also uses below it; ``"inclusive"`` always as its whole subtree (= ``"hce"``);
        ``"exclusive"`` as the label alone (= ``"ce"``).
    hce_form
        ``"log"``: exact log-space HCE (default); ``"reference"``: the published ``log(q + 1e-6)`` form.
    standardize
        Whether the first :meth:`train` scales every gene to zero mean and unit variance over the training cells
        (after the log normalisation; clipped at ±10, as :func:`scanpy.pp.scale` with ``max_value=10``). The mean
        and scale are stored with the weights and applied to every query. Default: ``True`` for the MLP and the
        linear model; ``False`` for TabNet (its input batch norm standardises already) and ``recipe="sctab"``
        (scTab's models read the log-normalised values directly). See :doc:`/training`.
    **backbone_kwargs
        Backbone hyperparameters. The MLP defaults to ``n_hidden=256, n_layers=3, dropout=0.2, input_dropout=0.2``;
        scTab's architecture is ``n_hidden=128, n_layers=8, dropout=0.1, input_dropout=0`` (the defaults of
        :class:`schce.nn.MLP`).

    Examples
    --------
    >>> schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    >>> model = schce.HCEClassifier(adata)
    >>> model.train(max_epochs=50, seed=0)
    >>> model.predict(query)
    >>> sc.pl.umap(query, color="schce_prediction")
    """

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        backbone: Literal["mlp", "linear"] = "mlp",
        loss: Literal["hce-aware", "hce", "ce"] = "hce-aware",
        label_semantics: Literal["auto", "inclusive", "exclusive"] = "auto",
        hce_form: Literal["log", "reference"] = "log",
        recipe: Literal["sctab"] | None = None,
        standardize: bool | None = None,
        **backbone_kwargs,
    ):
        super().__init__(adata, registry)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if label_semantics not in LABEL_SEMANTICS:
            raise ValueError(f"label_semantics must be one of {LABEL_SEMANTICS}, got {label_semantics!r}.")
        if hce_form not in ("log", "reference"):
            raise ValueError(f"hce_form must be 'log' or 'reference', got {hce_form!r}.")
        setup = self.registry_[_SETUP_KEY]
        self.hierarchy = Hierarchy.from_dict(setup["hierarchy"])
        self.genes: list[str] = list(setup["genes"])
        self.backbone, self.loss, self.hce_form, self.recipe = backbone, loss, hce_form, recipe
        self.label_semantics = label_semantics
        if standardize is None:
            standardize = recipe is None and DEFAULT_STANDARDIZE.get(backbone, False)
        self.standardize = bool(standardize)
        base = get_recipe(recipe, backbone).backbone_kwargs if recipe else DEFAULT_BACKBONE_KWARGS.get(backbone, {})
        arch = {**base, **backbone_kwargs}
        self.module = HCEModule(make_backbone(backbone, len(self.genes), self.hierarchy.n_labels, **arch))
        self._model_summary_string = (
            f"HCEClassifier: backbone={backbone}({', '.join(f'{k}={v!r}' for k, v in arch.items())}), "
            f"loss={loss}"
            + (f" ({label_semantics})" if loss == "hce-aware" else "")
            + ", "
            + (f"recipe={recipe}, " if recipe else "")
            + f"{self.hierarchy.n_labels} labels (ontology {self.hierarchy.version}), {len(self.genes)} genes "
            f"({setup['gene_id_type']}), training input: "
            + ("raw counts, normalised in the module" if setup["normalize"] else "used as given")
        )
        self.temperature_ = 1.0
        self.best_epoch_ = self.optimizer_ = None
        backbone_kwargs = arch  # saved in full, so later changes of the defaults leave saved models as they were
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        layer: str | None = None,
        batch_key: str | None = None,
        ontology=None,
        normalize: bool | Literal["auto"] = "auto",
        **kwargs,
    ) -> None:
        """Register ``adata`` for training.

        Everything is checked before anything is written; on success scvi-tools adds its registry columns
        (``_scvi_labels``, ``_scvi_batch``) to ``adata.obs``.

        Parameters
        ----------
        adata
            Cells × genes. ``var_names`` are the model's genes (Ensembl IDs preferred, symbols work).
        labels_key
            ``obs`` column of cell types: CL IDs (``CL:0000084``) or CL names / synonyms (``T cell``).
        layer
            Layer with the expression; default ``adata.X``. Raw counts are preferred.
        batch_key
            ``obs`` column naming each cell's batch or annotation source.
        ontology
            :class:`~schce.ontology.CellOntology`, OBO path or URL; default: the embedded CL release.
        normalize
            ``"auto"``: normalise (size factor to 1e4, log1p) when the data are integer counts; ``True`` /
            ``False`` to force.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        for key, what in ((labels_key, "labels_key"), (batch_key, "batch_key")):
            if key is not None and key not in adata.obs.columns:
                raise KeyError(
                    f"{what}={key!r} is not a column of adata.obs. Available columns: {list(adata.obs.columns)}."
                )
        state = cls._setup_state(adata, adata.obs[labels_key], labels_key, layer, ontology, normalize)

        setup_method_args = cls._get_setup_method_args(**locals())
        setup_method_args["setup_args"] = {
            "labels_key": labels_key,
            "layer": layer,
            "batch_key": batch_key,
            # a path or URL is kept so evaluate() can reload it; an in-memory ontology is recorded by its source
            "ontology": os.fspath(ontology) if isinstance(ontology, str | os.PathLike) else None,
            "normalize": normalize,
        }
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(adata, **kwargs)
        manager.registry[_SETUP_KEY] = state
        cls.register_manager(manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        labels_key: str,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        ontology=None,
        normalize: bool | Literal["auto"] = "auto",
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Register a :class:`~mudata.MuData` for training on its RNA modality.

        As :meth:`setup_anndata`, with the expression read from the modality named by ``modalities["rna_layer"]``.
        Other modalities (protein, ATAC) are left alone. :meth:`predict` on a MuData writes into the RNA modality
        and refreshes ``mdata.obs`` (``mdata.obs["rna:schce_prediction"]``).

        Parameters
        ----------
        mdata
            MuData whose RNA modality holds the same cells as ``mdata`` (``muon.pp.intersect_obs`` makes it so).
        labels_key
            ``obs`` column of cell types (CL IDs or names), in ``mdata.obs`` or in the modality named by
            ``modalities["labels_key"]``.
        rna_layer
            Layer of the RNA modality with the expression; default its ``X``.
        batch_key
            ``obs`` column of batches, in ``mdata.obs`` or in the modality named by ``modalities["batch_key"]``.
        ontology, normalize
            As in :meth:`setup_anndata`.
        modalities
            Which modality each argument refers to, as in scvi-tools: ``{"rna_layer": "rna"}`` (the default) and
            optionally ``"labels_key"`` / ``"batch_key"`` (absent: the column is in ``mdata.obs``).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> schce.HCEClassifier.setup_mudata(mdata, "cell_type", modalities={"rna_layer": "rna", "labels_key": "rna"})
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(mdata, MuData):
            raise TypeError(f"setup_mudata takes a MuData, got {type(mdata).__name__}; use setup_anndata for AnnData.")
        modalities = dict({"rna_layer": "rna"} if modalities is None else modalities)
        mods = cls._create_modalities_attr_dict(modalities, setup_method_args)
        for arg, mod in mods.items():
            if mod is not None and mod not in mdata.mod:
                raise KeyError(f"modalities[{arg!r}]={mod!r} is not a modality of mdata; it has {list(mdata.mod)}.")
        if mods.rna_layer is None:
            raise ValueError('Name the RNA modality: modalities={"rna_layer": "rna"}.')
        rna = mdata.mod[mods.rna_layer]
        if rna.n_obs != mdata.n_obs or not rna.obs_names.equals(mdata.obs_names):
            raise ValueError(
                f"The RNA modality {mods.rna_layer!r} has {rna.n_obs} of mdata's {mdata.n_obs} cells (or another "
                "order); keep the cells measured in every modality first (muon.pp.intersect_obs(mdata))."
            )
        obs_of = {}
        for key, arg in ((labels_key, "labels_key"), (batch_key, "batch_key")):
            obs, where = (mdata.obs, "mdata.obs") if mods[arg] is None else (mdata[mods[arg]].obs, mods[arg])
            if key is not None and key not in obs.columns:
                hint = [m for m in mdata.mod if key in mdata.mod[m].obs.columns]
                raise KeyError(
                    f"{arg}={key!r} is not a column of {where}"
                    + (f"; it is in modality {hint[0]!r}: add {{{arg!r}: {hint[0]!r}}} to modalities." if hint else ".")
                )
            obs_of[arg] = obs
        state = cls._setup_state(rna, obs_of["labels_key"][labels_key], labels_key, rna_layer, ontology, normalize)
        # Every modality's features as registered, so a loaded model knows them without the data.
        state["modality_genes"] = {m: [str(v) for v in mdata.mod[m].var_names] for m in mdata.mod}
        setup_method_args["setup_args"]["ontology"] = (
            os.fspath(ontology) if isinstance(ontology, str | os.PathLike) else None
        )
        setup_method_args["setup_args"]["modalities"] = modalities
        fields = [
            MuDataLayerField(REGISTRY_KEYS.X_KEY, rna_layer, mod_key=mods.rna_layer, is_count_data=False),
            MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, mod_key=mods.labels_key),
            MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=mods.batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        manager.register_fields(mdata, **kwargs)
        manager.registry[_SETUP_KEY] = state
        cls.register_manager(manager)

    @staticmethod
    def _setup_state(adata: AnnData, raw: pd.Series, labels_key: str, layer: str | None, ontology, normalize) -> dict:
        """Check the expression and labels of the training cells; schce's section of the registry."""
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(f"adata is empty ({adata.n_obs} cells × {adata.n_vars} genes); nothing to train on.")
        X = get_matrix(adata, layer)
        if raw.isna().any():
            raise ValueError(
                f"{int(raw.isna().sum())} cell(s) have no label in obs[{labels_key!r}]. Drop them "
                "(adata = adata[adata.obs[key].notna()].copy()) before setup."
            )
        onto = load_cell_ontology(ontology)
        label_map = onto.map_labels(raw.astype(str).unique())
        label_ids = sorted(set(label_map.values()))
        if len(label_ids) < 2:
            raise ValueError(
                f"obs[{labels_key!r}] has a single cell type ({label_ids[0]}); a classifier needs at least two."
            )
        where = f"adata.layers[{layer!r}]" if layer else "adata.X"
        normalize_used = resolve_normalize(normalize, check_expression(X, adata.n_obs, where), where)
        genes = strip_ensembl_version(adata.var_names)
        return {
            "label_map": {str(k): v for k, v in label_map.items()},
            "hierarchy": Hierarchy.from_ontology(label_ids, onto).to_dict(),
            "genes": [str(g) for g in genes],
            "gene_id_type": gene_id_type(genes),
            "normalize": bool(normalize_used),
            "ontology_source": onto.source,
        }

    # ------------------------------------------------------------------ training
    def _label_codes(self) -> np.ndarray:
        """Every cell's label as an index into ``hierarchy.labels``."""
        setup = self.registry_[_SETUP_KEY]
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
                    X, codes, source, normalize=self.registry_[_SETUP_KEY]["normalize"], seed=seed, rows=train_idx
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
            normalize=self.registry_[_SETUP_KEY]["normalize"],
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
            from schce.data._store_model import scaling_loader

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
            mean, std, n = gene_moments(batches, self.registry_[_SETUP_KEY]["normalize"], max_cells)
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
            from schce.data import _store_model

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
                from schce.data._store_model import loader_outputs

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

    def fine_tune(
        self,
        adata: AnnData | MuData,
        labels_key: str,
        max_epochs: int = 50,
        freeze_encoder: bool = False,
        new_labels: Literal["add", "error"] = "add",
        layer: str | None = None,
        gene_symbols: str | None = None,
        normalize: bool | Literal["auto"] = "auto",
        ontology=None,
        validation_size: float = 0.1,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        lr_gamma: float = 0.98,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        class_weights: Literal["balanced"] | None = "balanced",
        accelerator: str = "auto",
        devices: int | str = 1,
        seed: int = 0,
        num_workers: int = 0,
        enable_progress_bar: bool = True,
        calibrate: bool = True,
        **trainer_kwargs,
    ) -> list[str]:
        """Continue training from the current weights on new labelled cells.

        Works on any trained model: one trained here, one from :meth:`load`, or a published checkpoint from
        :meth:`from_sctab_checkpoint`. The cells' genes are aligned to the model's (missing genes zero-filled, as in
        :meth:`predict`). Labels the model does not have are added as new outputs after the existing ones, and the
        hierarchy gains them (with their ontology ancestors); the existing labels keep their output indices and,
        until training moves them, their weights. Training then runs as in :meth:`train` (stratified validation
        split, early stopping on the validation hierarchy-corrected macro F1, best epoch kept, temperature
        re-fitted). Everything is checked first: on bad input the model is unchanged.

        The cells here are all the model sees while fine-tuning, so labels absent from them can be forgotten; add
        some of the original training cells to keep them.

        Parameters
        ----------
        adata
            Labelled cells (AnnData, or MuData whose RNA modality is used); not modified.
        labels_key
            ``obs`` column with the labels (CL IDs or names).
        max_epochs
            Maximum number of passes over the cells.
        freeze_encoder
            Train only the output layer (the rest of the network, BatchNorm statistics included, stays as it is).
            Not available for the linear backbone, which has no encoder.
        new_labels
            ``"add"``: labels the model lacks become new outputs; ``"error"``: raise, naming them.
        layer, gene_symbols, normalize
            As in :meth:`predict`.
        ontology
            Ontology to map labels and place new ones; default: the one the model was set up with when it was a path
            or URL, else the embedded CL release.
        validation_size, batch_size, lr, weight_decay, lr_gamma, early_stopping, early_stopping_patience
            As in :meth:`train`.
        class_weights, accelerator, devices, seed, num_workers, enable_progress_bar, calibrate, **trainer_kwargs
            As in :meth:`train`.

        Returns
        -------
        The CL IDs of the labels added (empty when there were none).
        """
        if not self.is_trained_:
            raise RuntimeError("fine_tune continues training a trained model: call train() first, or load a model.")
        if new_labels not in ("add", "error"):
            raise ValueError(f"new_labels must be 'add' or 'error', got {new_labels!r}.")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {max_epochs}.")
        if batch_size is not None and batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (BatchNorm needs two cells), got {batch_size}.")
        if class_weights not in ("balanced", None):
            raise ValueError(f"class_weights must be 'balanced' or None, got {class_weights!r}.")
        default_lr, default_wd = DEFAULT_OPTIMIZER.get(self.backbone, DEFAULT_OPTIMIZER["mlp"])
        lr = default_lr if lr is None else lr
        weight_decay = default_wd if weight_decay is None else weight_decay
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        if freeze_encoder and output_layer(self.module.classifier) is self.module.classifier:
            raise ValueError(f"The {self.backbone} backbone has no encoder to freeze; use freeze_encoder=False.")
        raw = self._labels(adata, labels_key)
        onto = load_cell_ontology(ontology if ontology is not None else self.registry_["setup_args"].get("ontology"))
        terms = raw.astype(str).map(onto.map_labels(raw.astype(str).unique())).to_numpy()
        added = sorted(set(terms) - set(self.hierarchy.labels))
        if added and new_labels == "error":
            raise ValueError(
                f"{len(added)} label(s) of obs[{labels_key!r}] are not outputs of the model: "
                f"{[f'{t} ({onto.name(t)})' for t in added]}. Pass new_labels='add' to add them, or drop those cells."
            )
        hierarchy = Hierarchy.from_ontology([*self.hierarchy.labels, *added], onto) if added else self.hierarchy
        data, X, aligner, normalize_used = self._prepare(adata, layer, gene_symbols, normalize)
        codes = hierarchy.label_index(terms)
        train_idx, val_idx, _ = split_cells(codes, validation_size, 0.0, seed)

        pl.seed_everything(seed, workers=True, verbose=False)
        # Train a copy, so an interrupted or failed run leaves the model as it was.
        saved = (self.module, self.hierarchy, self.temperature_, self.history_, self.best_epoch_, self.optimizer_)
        self.module = copy.deepcopy(self.module).train()
        self.hierarchy = hierarchy
        extend_head(self.module.classifier, len(added))
        head = output_layer(self.module.classifier)
        frozen = [m for m in self.module.classifier.children() if m is not head] if freeze_encoder else []
        for m in frozen:
            m.requires_grad_(False)
        if added:
            logger.info("Added %d label(s) to the model: %s.", len(added), ", ".join(hierarchy.names(added)))
        try:
            self._fit(
                X,
                codes,
                train_idx,
                val_idx,
                normalize=normalize_used,
                aligner=aligner,
                callbacks=[FrozenModules(frozen)] if frozen else [],
                max_epochs=max_epochs,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                lr_gamma=lr_gamma,
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
        except BaseException:
            self.module, self.hierarchy, self.temperature_, self.history_, self.best_epoch_, self.optimizer_ = saved
            raise
        finally:
            for m in frozen:
                m.requires_grad_(True)
        setup = self.registry_[_SETUP_KEY]
        setup["hierarchy"] = hierarchy.to_dict()
        setup.setdefault("fine_tuning", []).append(
            {"n_cells": int(data.n_obs), "labels_added": added, "freeze_encoder": bool(freeze_encoder)}
        )
        n_old = len(saved[1].labels)
        self._model_summary_string = self._model_summary_string.replace(
            f"{n_old} labels", f"{hierarchy.n_labels} labels", 1
        )
        return added

    # ------------------------------------------------------------------ inference
    def _run(
        self, X, rows: np.ndarray, normalize: bool, aligner: GeneAligner | None, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and embeddings of ``rows`` of ``X`` (module in eval mode, no gradients)."""
        from schce.data._store_model import loader_outputs

        out = loader_outputs(self.module, make_loader(X, rows, batch_size, aligner=aligner), normalize)
        return out["logits"], out["embeddings"]

    def _rna(self, data: AnnData | MuData) -> AnnData:
        """``data`` itself, or for a MuData its RNA modality (the one given to :meth:`setup_mudata`, else ``"rna"``)."""
        if not isinstance(data, MuData):
            return data
        mod = (self.registry_["setup_args"].get("modalities") or {}).get("rna_layer", "rna")
        if mod not in data.mod:
            raise KeyError(
                f"The MuData has no modality {mod!r} (it has {list(data.mod)}); pass the RNA modality itself, "
                "e.g. model.predict(mdata['gex'])."
            )
        return data.mod[mod]

    def _registered_layer(self) -> str | None:
        args = self.registry_["setup_args"]
        return args["rna_layer"] if "rna_layer" in args else args["layer"]

    def _registered_matrix(self):
        """The registered expression (the RNA modality's for a MuData)."""
        return get_matrix(self._rna(self.adata), self._registered_layer())

    def _prepare(
        self,
        adata: AnnData | MuData | None,
        layer: str | None,
        gene_symbols: str | None,
        normalize: bool | Literal["auto"],
    ) -> tuple[AnnData, object, GeneAligner, bool]:
        """The query's RNA AnnData, its matrix, the gene alignment and whether to normalise, after all input checks."""
        if adata is None:
            adata = self.adata
            if adata is None:
                raise ValueError("Pass the AnnData to predict on: this model has no registered AnnData.")
            if layer is None:
                layer = self._registered_layer()
        adata = self._rna(adata)
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData or MuData, got {type(adata).__name__}.")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(f"The query is empty ({adata.n_obs} cells × {adata.n_vars} genes).")
        if gene_symbols is not None:
            if gene_symbols not in adata.var.columns:
                raise KeyError(
                    f"gene_symbols={gene_symbols!r} is not a column of adata.var "
                    f"(available: {list(adata.var.columns)}). Pass None to match on var_names."
                )
            query_genes, where = adata.var[gene_symbols].astype(str).to_numpy(), f"var[{gene_symbols!r}]"
        else:
            query_genes, where = adata.var_names, "var_names"
        aligner = GeneAligner(self.genes, query_genes, where=where)
        X = get_matrix(adata, layer)
        where_x = f"adata.layers[{layer!r}]" if layer else "adata.X"
        normalize_used = resolve_normalize(normalize, check_expression(X, adata.n_obs, where_x), where_x)
        return adata, X, aligner, normalize_used

    def _forward(
        self,
        adata: AnnData | MuData | None,
        layer: str | None,
        gene_symbols: str | None,
        batch_size: int,
        normalize: bool | Literal["auto"],
    ) -> tuple[np.ndarray, np.ndarray, GeneAligner, bool, AnnData]:
        """Logits and embeddings of every cell, after all input checks."""
        if not self.is_trained_:
            raise RuntimeError("The model is not trained yet: call model.train() first, or HCEClassifier.load(...).")
        adata, X, aligner, normalize_used = self._prepare(adata, layer, gene_symbols, normalize)
        logits, embeddings = self._run(X, np.arange(adata.n_obs), normalize_used, aligner, batch_size)
        return logits, embeddings, aligner, normalize_used, adata

    def predict(
        self,
        adata: AnnData | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        key_added: str = "schce",
        coarse_threshold: float = 0.5,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
        inplace: bool = True,
        calibrated: bool = True,
    ) -> pd.DataFrame:
        """Predict cell types and write them into ``adata``.

        Writes, with prefix ``key_added``:

        - ``obs["{key}_prediction"]`` (CL name of the argmax label), ``obs["{key}_prediction_ontology_term_id"]``,
          ``obs["{key}_confidence"]`` (its probability);
        - ``obs["{key}_prediction_coarse"]`` (+ ``_ontology_term_id``): the deepest term (label or ancestor) whose
          subtree probability is at least ``coarse_threshold`` — a back-off when the model is unsure;
        - ``obsm["{key}_probabilities"]`` (cells × labels), ``obsm["{key}_hierarchical_scores"]`` (cells ×
          labels and their ancestors: the summed probability of each term's subtree), ``obsm["X_{key}"]`` (the
          penultimate-layer embedding);
        - ``uns["{key}"]``: model, ontology version, threshold, gene overlap.

        Nothing else in ``adata`` changes.

        Parameters
        ----------
        adata
            Query cells; default: the registered AnnData. Dense, sparse or backed.
        layer
            Layer with the expression; default ``adata.X`` (the registered layer for the registered AnnData).
        gene_symbols
            ``var`` column holding identifiers of the model's type, when ``var_names`` do not.
        key_added
            Prefix of the output keys.
        coarse_threshold
            Subtree probability needed for the coarse prediction.
        normalize
            ``"auto"`` normalises integer counts and leaves non-integer data as it is.
        batch_size
            Cells per forward pass.
        inplace
            Write into ``adata``; ``False`` only returns the table.
        calibrated
            Divide the logits by the temperature fitted after training (probabilities, confidence and the coarse
            call change; the argmax label does not).

        Returns
        -------
        The obs columns above as a DataFrame indexed by ``obs_names``.
        """
        if not 0 < coarse_threshold <= 1:
            raise ValueError(f"coarse_threshold must be in (0, 1], got {coarse_threshold}.")
        mdata = adata if adata is not None else self.adata
        mdata = mdata if isinstance(mdata, MuData) else None
        logits, emb, aligner, normalize_used, adata = self._forward(adata, layer, gene_symbols, batch_size, normalize)
        probs = self._probabilities(logits, calibrated)
        obs, probs_df, scores_df = prediction_frame(probs, self.hierarchy, adata.obs_names, key_added, coarse_threshold)
        if inplace:
            from schce import __version__

            uns = {
                "schce_version": __version__,
                "backbone": self.backbone,
                "loss": self.loss,
                "label_semantics": self.label_semantics,
                "n_labels": self.hierarchy.n_labels,
                "ontology_version": self.hierarchy.version,
                "coarse_threshold": float(coarse_threshold),
                "temperature": float(self.temperature_ if calibrated else 1.0),
                "gene_overlap": aligner.summary(),
                "normalized": bool(normalize_used),
            }
            obsm = {f"{key_added}_probabilities": probs_df, f"{key_added}_hierarchical_scores": scores_df}
            obsm[f"X_{key_added}"] = emb
            write_outputs(adata, obs, obsm, uns, key_added)
            if mdata is not None:  # our columns only, as mdata.obs["rna:schce_prediction"], ...
                mod = next(name for name, m in mdata.mod.items() if m is adata)
                with warnings.catch_warnings():  # pandas' copy warning raised inside mudata 0.3's pull_obs
                    warnings.simplefilter("ignore", pd.errors.SettingWithCopyWarning)
                    mdata.pull_obs(columns=list(obs.columns), mods=[mod])
        return obs

    def _probabilities(self, logits: np.ndarray, calibrated: bool) -> np.ndarray:
        t = self.temperature_ if calibrated else 1.0
        return torch.softmax(torch.from_numpy(logits).double() / t, dim=1).numpy()

    def evaluate(
        self,
        adata: AnnData | None = None,
        labels_key: str | None = None,
        groupby: Sequence[str] = DEFAULT_GROUPBY,
        output_dir: str | os.PathLike | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        coarse_threshold: float = 0.5,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
        calibrated: bool = True,
        ontology=None,
        datamodule: pl.LightningDataModule | None = None,
        split: Literal["test", "val", "train"] = "test",
    ) -> EvaluationResult:
        """Score the model on labelled cells: exact and hierarchy-corrected metrics, per class and per group.

        True labels may be CL IDs or names. A true label that is a model label or an ancestor of model labels is
        scored with the scTab rule (a prediction is correct when it is the truth or one of its descendants). A
        label finer than the model's (a descendant of model labels, but not itself a label) is scored against its
        nearest model ancestor. A label with no model ancestor below the root cannot be scored; it is counted in
        ``n_not_scorable``. No cell is dropped silently: every count is in ``result.overall``.

        Parameters
        ----------
        adata
            Labelled cells; ``adata`` is not modified.
        labels_key
            ``obs`` column with the true labels.
        groupby
            ``obs`` columns to break the metrics down by (those absent are skipped).
        output_dir
            When given, write the tables there (see :meth:`EvaluationResult.write`).
        layer, gene_symbols, normalize, batch_size, calibrated
            As in :meth:`predict`.
        coarse_threshold
            Subtree probability for the coarse back-off calls whose accuracy is reported.
        ontology
            Ontology to place true labels outside the model's terms; default: the one given to
            :meth:`setup_anndata` when it was a path or URL, else the embedded CL release.
        datamodule, split
            Instead of ``adata``: stream a datamodule's ``split`` loader (e.g. the test split of an
            :class:`~schce.data.SCTabStoreDataModule`); true labels are its ``y`` codes, and the groups come from
            its ``read_obs(split)`` when it has one. Memory: the probabilities, cells × labels.

        Returns
        -------
        :class:`~schce.evaluation.EvaluationResult` with ``overall``, ``per_class``, ``per_group`` and ``detailed``.
        """
        if datamodule is not None:
            from schce.data._store_model import datamodule_predictions

            onto = load_cell_ontology(ontology)
            true_terms, logits, obs = datamodule_predictions(self, datamodule, split)
            probs = self._probabilities(logits, calibrated)
            result = evaluate_predictions(
                true_terms, probs, self.hierarchy, onto.ancestors, obs, groupby, coarse_threshold, obs.index
            )
            if output_dir is not None:
                result.write(output_dir)
            return result
        if adata is None or labels_key is None:
            raise TypeError("Pass the labelled AnnData and its labels_key, or datamodule= to score a store's split.")
        raw = self._labels(adata, labels_key)
        onto = load_cell_ontology(ontology if ontology is not None else self.registry_["setup_args"].get("ontology"))
        mapping = onto.map_labels(raw.astype(str).unique())
        true_terms = raw.astype(str).map(mapping).to_numpy()
        logits, _, _, _, adata = self._forward(adata, layer, gene_symbols, batch_size, normalize)
        result = evaluate_predictions(
            true_terms,
            self._probabilities(logits, calibrated),
            self.hierarchy,
            onto.ancestors,
            obs=adata.obs,
            groupby=groupby,
            coarse_threshold=coarse_threshold,
            obs_names=adata.obs_names,
        )
        if output_dir is not None:
            result.write(output_dir)
        return result

    def _labels(self, data: AnnData | MuData, labels_key: str) -> pd.Series:
        """``obs[labels_key]`` of the RNA cells (for a MuData: the RNA modality's column, else ``mdata.obs``'s)."""
        rna = self._rna(data)
        if not isinstance(rna, AnnData):
            raise TypeError(f"Expected an AnnData or MuData, got {type(data).__name__}.")
        obs = rna.obs
        if labels_key not in obs.columns and isinstance(data, MuData) and labels_key in data.obs.columns:
            obs = data.obs.reindex(rna.obs_names)
        if labels_key not in obs.columns:
            raise KeyError(
                f"labels_key={labels_key!r} is not a column of adata.obs. Available columns: {list(obs.columns)}."
            )
        raw = obs[labels_key]
        if raw.isna().any():
            raise ValueError(f"{int(raw.isna().sum())} cell(s) have no label in obs[{labels_key!r}]; drop them first.")
        return raw

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
    ) -> np.ndarray:
        """Penultimate-layer embedding, cells × ``n_latent`` (the logits for the linear backbone)."""
        return self._forward(adata, layer, gene_symbols, batch_size, normalize)[1]

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Save the model to a directory, atomically.

        Writes ``model.pt`` (weights only) and ``schce.json`` (labels, hierarchy, genes, setup, history).

        Parameters
        ----------
        dir_path
            Target directory.
        overwrite
            Replace an existing directory.
        save_anndata
            Also write the registered AnnData as ``adata.h5ad``.

        Under distributed training (``strategy="ddp"``) only rank 0 writes; the other ranks return.
        """
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        from schce import __version__

        if getattr(rank_zero_only, "rank", 0) != 0:
            return

        meta = {
            "format": _io.FORMAT,
            "format_version": _io.FORMAT_VERSION,
            "schce_version": __version__,
            "model_class": type(self).__name__,
            "init_params": self.init_params_,
            "registry": {k: v for k, v in self.registry_.items()},
            "is_trained": bool(self.is_trained_),
            "temperature": float(self.temperature_),
            "optimizer": self.optimizer_,
            "best_epoch": None if self.best_epoch_ is None else int(self.best_epoch_),
            "history": {
                k: {"epoch": df.index.tolist(), "value": df.iloc[:, 0].tolist()}
                for k, df in (self.history_ or {}).items()
            },
            "train_indices": None if self.train_indices_ is None else np.asarray(self.train_indices_).tolist(),
            "validation_indices": None
            if self.validation_indices_ is None
            else np.asarray(self.validation_indices_).tolist(),
            "test_indices": None if self.test_indices_ is None else np.asarray(self.test_indices_).tolist(),
        }
        text = _io.dumps(meta)
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

        def write(tmp: Path) -> None:
            torch.save(state, tmp / _io.WEIGHTS_FILE)
            (tmp / _io.META_FILE).write_text(text)
            if save_anndata and self.adata is not None:
                self.adata.write_h5ad(tmp / _io.ADATA_FILE)

        _io.write_dir_atomically(dir_path, overwrite, write)
        logger.info("Saved the model to %s.", dir_path)

    @classmethod
    def load(cls, dir_path: str | os.PathLike, accelerator: str = "auto", device: int | str = "auto") -> HCEClassifier:
        """Load a model written by :meth:`save`; predict on any AnnData with :meth:`predict`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        accelerator, device
            Where to put the weights (``"auto"``: a GPU when there is one).
        """
        meta = _io.read_meta(dir_path)
        if meta.get("model_class") != cls.__name__:
            raise ValueError(f"{dir_path} holds a {meta.get('model_class')}, not a {cls.__name__}.")
        try:
            state = torch.load(Path(dir_path) / _io.WEIGHTS_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for damaged files
            raise ValueError(f"{Path(dir_path) / _io.WEIGHTS_FILE} is corrupt and cannot be read: {err}") from err
        params = meta["init_params"]
        model = cls(None, meta["registry"], **params["non_kwargs"], **params["kwargs"].get("backbone_kwargs", {}))
        if "input_mean" in state:
            model.module.set_input_scaling(state["input_mean"], state["input_scale"])
        try:
            model.module.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"The weights in {dir_path} do not match the model described there: {err}") from err
        model.is_trained_ = meta["is_trained"]
        model.temperature_ = float(meta.get("temperature", 1.0))
        model.optimizer_, model.best_epoch_ = meta.get("optimizer"), meta.get("best_epoch")  # None in older files
        model.history_ = {
            k: pd.DataFrame({k: h["value"]}, index=pd.Index(h["epoch"], name="epoch"))
            for k, h in meta["history"].items()
        }
        model.train_indices_ = None if meta["train_indices"] is None else np.asarray(meta["train_indices"])
        model.validation_indices_ = (
            None if meta["validation_indices"] is None else np.asarray(meta["validation_indices"])
        )
        model.test_indices_ = None if meta.get("test_indices") is None else np.asarray(meta["test_indices"])
        from scvi.model._utils import parse_device_args

        _, _, torch_device = parse_device_args(accelerator, device, return_device="torch", validate_single_device=True)
        model.module.to(torch_device)
        model.module.eval()
        return model

    @classmethod
    def from_sctab_checkpoint(
        cls,
        ckpt_path: str | os.PathLike,
        var_path: str | os.PathLike,
        cell_type_path: str | os.PathLike,
        ontology=None,
    ) -> HCEClassifier:
        """Load a published scTab or HCE-paper Lightning checkpoint as a trained classifier.

        Weights are read from the ``classifier.`` entries (the buffers ``class_weights``, ``child_lookup``,
        ``child_lookup_transposed`` and ``augmentations`` are not weights); the backbone (linear, MLP or TabNet)
        and its sizes from the weights' shapes; the loss is HCE when the checkpoint holds
        ``child_lookup_transposed``. The model then predicts on any AnnData with the usual gene alignment.

        Parameters
        ----------
        ckpt_path
            The ``.ckpt`` file.
        var_path
            The store's ``var.parquet`` (``feature_id`` Ensembl IDs, ``feature_name`` symbols): the input genes.
        cell_type_path
            The store's ``categorical_lookup/cell_type.parquet``: the output labels (CL names, mapped to CL IDs).
        ontology
            Ontology for the name mapping and the hierarchy; default: the embedded CL release.
        """
        from schce import _sctab

        ckpt = _sctab.load_checkpoint(ckpt_path)
        backbone, arch, state, loss = _sctab.classifier_from_checkpoint(ckpt)
        genes = _sctab.read_genes(var_path)
        names = _sctab.read_labels(cell_type_path)
        onto = load_cell_ontology(ontology)
        mapping = onto.map_labels(names)
        labels = [mapping[n] for n in names]
        if len(set(labels)) != len(labels):
            raise ValueError(f"Several labels of {cell_type_path} map to the same CL term; cannot keep their order.")
        registry = cls._registry_without_data(genes, labels, onto, Hierarchy.from_ontology(labels, onto), True)
        # scTab's models read the log-normalised values as they are.
        model = cls(None, registry, backbone=backbone, loss=loss, standardize=False, **arch)
        try:
            model.module.classifier.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"The weights in {ckpt_path} do not fit {len(genes)} genes × {len(labels)} labels: {err}"
            ) from err
        model.module.eval()
        model.is_trained_ = True
        logger.info("Loaded a %s %s classifier: %d genes, %d labels.", loss.upper(), backbone, len(genes), len(labels))
        return model

    @classmethod
    def _registry_without_data(cls, genes, labels, onto, hierarchy: Hierarchy, normalize: bool) -> dict:
        """A registry for a model built from files: one empty placeholder cell per label, then our label order."""
        placeholder = AnnData(
            X=sp.csr_matrix((len(labels), len(genes)), dtype=np.float32),
            obs=pd.DataFrame({"label": labels}, index=[f"cell{i}" for i in range(len(labels))]),
            var=pd.DataFrame(index=pd.Index(genes)),
        )
        cls.setup_anndata(placeholder, labels_key="label", ontology=onto, normalize=normalize)
        registry = cls._get_most_recent_anndata_manager(placeholder, required=True).registry
        registry[_SETUP_KEY]["hierarchy"] = hierarchy.to_dict()
        return registry

    @classmethod
    def from_sctab_store(
        cls,
        path: str | os.PathLike,
        backbone: Literal["mlp", "linear", "tabnet"] = "mlp",
        loss: Literal["hce", "ce"] = "hce",
        hierarchy: Literal["store", "ontology"] = "store",
        normalize: bool | Literal["auto"] = "auto",
        ontology=None,
        **backbone_kwargs,
    ) -> HCEClassifier:
        """An untrained classifier for a scTab store (either layout); train it with ``model.train(datamodule=...)``.

        Genes come from ``var.parquet`` (``feature_id``), labels from ``categorical_lookup/cell_type.parquet`` mapped
        to CL IDs (in code order, so the store's ``cell_type`` codes are the model's label codes), the hierarchy from
        ``cell_type_hierarchy/child_matrix.npy``, checked against the ontology: differences are logged and kept in
        ``model.hierarchy_differences_`` (see :func:`schce.data.compare_hierarchy`).

        Parameters
        ----------
        path
            Store directory.
        backbone, loss, **backbone_kwargs
            As in :class:`HCEClassifier`.
        hierarchy
            ``"store"``: the relations of ``child_matrix.npy``; ``"ontology"``: the ontology's.
        normalize
            ``"auto"`` normalises in the model when the store holds integer counts (our synthetic stores) and not
            when it holds normalised values (scTab's published store).
        ontology
            Ontology for the label mapping and the check; default: the embedded CL release.

        Examples
        --------
        >>> dm = schce.data.SCTabStoreDataModule("merlin_cxg_2023_05_15_sf-log1p", batch_size=2048, num_workers=8)
        >>> model = schce.HCEClassifier.from_sctab_store(dm.path, backbone="mlp")
        >>> model.train(datamodule=dm, max_epochs=20)
        >>> model.evaluate(datamodule=dm).overall
        """
        from schce.data._store_model import store_setup

        setup = store_setup(path, ontology, hierarchy, normalize)
        registry = cls._registry_without_data(
            setup["genes"], setup["labels"], setup["ontology"], setup["hierarchy"], setup["normalize"]
        )
        registry[_SETUP_KEY]["sctab_store"] = os.fspath(path)
        model = cls(None, registry, backbone=backbone, loss=loss, **backbone_kwargs)
        model.hierarchy_differences_ = setup["differences"]
        return model

    # ------------------------------------------------------------------ display
    def view_anndata_setup(self, adata: AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print how the training AnnData was registered (works for loaded models too)."""
        if adata is None and self.adata is None:
            setup = self.registry_["setup_args"]
            lines = [f"{type(self).__name__} setup (loaded model, no AnnData attached):"]
            lines += [f"  {k}: {v!r}" for k, v in setup.items()]
            lines.append(f"  labels: {self.hierarchy.n_labels} ({', '.join(self.hierarchy.names()[:5])}, ...)")
            lines.append(f"  genes: {len(self.genes)}")
            rich.print("\n".join(lines))
            return
        super().view_anndata_setup(adata, hide_state_registries)

    def __repr__(self) -> str:
        return self.summary_string
