"""The data-module contract that training reads, and the small rules every data path shares.

Three data paths feed :meth:`~schce.HCEClassifier.train`: the registered AnnData
(:class:`~schce.data.AnnDataModule`), scTab stores (:class:`~schce.data.SCTabStoreDataModule`) and census streaming
(:class:`~schce.data.census.CensusDataModule`). Each implements :class:`HCEDataModule`, so the training code asks
every one the same questions and has a single path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

SPLITS = ("train", "val", "test")
#: Members :func:`check_datamodule` requires (beyond Lightning's loaders).
CONTRACT = (
    "n_genes",
    "labels",
    "n_batches",
    "batch_size",
    "n_values",
    "class_weights",
    "n_cells",
    "label_counts",
    "scaling_loader",
    "annotation_targets",
    "check_train_options",
    "resumable_order",
    "read_obs",
    "train_dataloader",
    "val_dataloader",
    "test_dataloader",
)


@runtime_checkable
class HCEDataModule(Protocol):
    """What training, calibration and evaluation need from a data module.

    Batches are dicts ``{"x": float32 (B, n_genes), "y": int64 label codes}``, plus ``"batch"`` (batch codes, for
    the batch terms), ``"target"`` (each cell's acceptable-label row, after :meth:`annotation_targets`) and ``"idx"``
    (cell ids, for :meth:`read_obs`) where the module has them.

    Attributes
    ----------
    n_genes
        Genes per cell, in the model's gene order.
    labels
        One entry per label code ``y`` (the model's label order).
    n_batches
        Distinct ``"batch"`` codes (1 when the module yields none).
    batch_size
        Training cells per batch.
    n_values
        Training values held in memory (cells × genes), or ``None`` when the data stream (full-batch L-BFGS needs
        them in memory).
    class_weights
        Stored class weights (a scTab store's ``class_weights.npy``), else ``None``: balanced weights are then
        computed from :meth:`label_counts`.
    """

    n_genes: int
    labels: Sequence
    n_batches: int
    batch_size: int
    n_values: int | None
    class_weights: np.ndarray | None

    def n_cells(self, split: str) -> int:
        """Cells in a split (``"train"``, ``"val"`` or ``"test"``)."""

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Cells per label code in a split."""

    def scaling_loader(self) -> tuple[Iterable[dict], int | None]:
        """Training batches to estimate the gene scaling from, and how many cells to read (``None``: all)."""

    def annotation_targets(self, hierarchy, label_semantics: str) -> np.ndarray:
        """Acceptable-label masks of ``loss="hce-aware"``; training batches then carry each cell's row as ``"target"``.

        Raises :class:`ValueError` when the module cannot read label meanings from its cells.
        """

    def check_train_options(self, batch_terms: bool, augment: bool) -> None:
        """Refuse the :meth:`~schce.HCEClassifier.train` options this module cannot serve, naming option and fix.

        ``batch_terms``: the adversarial or batch-mixing term is on (they need two batches or more); ``augment``:
        ``augment=True``, a matrix to build from the module's cells. Modules that stream their cells use
        :func:`check_streaming_options`.
        """

    def resumable_order(self) -> tuple[Any, dict] | None:
        """The training loader's :class:`~schce.data.EpochBatchSampler` and the settings a resumed run must share.

        ``None`` when the module cannot resume mid-epoch (it then restarts the interrupted epoch's order).
        """

    def read_obs(self, split: str) -> Any:
        """Cell metadata of a split (a DataFrame indexed by the batches' ``"idx"``), for per-group scores."""

    def train_dataloader(self) -> Iterable[dict]: ...

    def val_dataloader(self) -> Iterable[dict] | None: ...

    def test_dataloader(self) -> Iterable[dict]: ...


def check_datamodule(datamodule, n_genes: int, n_labels: int) -> None:
    """A data module must implement :class:`HCEDataModule` and feed the model's genes and labels."""
    missing = [name for name in CONTRACT if not hasattr(datamodule, name)]
    if missing:
        raise TypeError(
            f"datamodule must implement schce.data.HCEDataModule; {type(datamodule).__name__} lacks {missing}. "
            "Use SCTabStoreDataModule, CensusDataModule or AnnDataModule, or add those members."
        )
    if datamodule.n_genes != n_genes:
        raise ValueError(f"The datamodule yields {datamodule.n_genes} genes; the model expects {n_genes}.")
    if len(datamodule.labels) != n_labels:
        raise ValueError(
            f"The datamodule's labels ({len(datamodule.labels)}) are not the model's ({n_labels}): build the model "
            "from the same store with HCEClassifier.from_sctab_store."
        )


def check_batch_terms(n_batches: int, batch_terms: bool) -> None:
    """The batch terms (``adversarial_weight``, ``batch_mixing_weight``) need cells of two batches or more."""
    if batch_terms and n_batches < 2:
        raise ValueError(
            f"The data has {n_batches} batch; the batch terms (adversarial_weight, batch_mixing_weight) need at least "
            "two. Set them to 0, or register a batch_key with several batches."
        )


def check_streaming_options(datamodule, batch_terms: bool, augment: bool) -> None:
    """The train() options of a module that streams its cells (scTab store, census): no matrix is built from them."""
    if augment:
        raise ValueError(
            f"augment=True builds the matrix from registered AnnData cells, which {type(datamodule).__name__} streams; "
            "pass a ready matrix instead (e.g. augment=np.load('<store>/augmentations.npy'))."
        )
    check_batch_terms(datamodule.n_batches, batch_terms)


def check_batch_size(batch_size: int | None) -> None:
    """Training batches need two cells: BatchNorm cannot normalise one."""
    if batch_size is not None and batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (BatchNorm needs two cells), got {batch_size}.")


def check_split(split: str) -> None:
    """``split`` names one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}.")


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """``N / (K · n_c)`` for each label ``c`` with ``n_c > 0`` training cells (``K`` such labels), 0 for the rest."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def macro_validation_weights(val_counts: np.ndarray, train_counts: np.ndarray) -> np.ndarray:
    """``1 / n_c`` for each label with ``n_c > 0`` validation cells and some training cells, 0 for the rest.

    Weighing each validation cell so makes the weighted mean loss the mean over labels of each label's mean loss:
    every label counts alike, as in macro F1, whatever the label's training count.
    """
    val_counts = np.asarray(val_counts, dtype=np.float64)
    weights = np.zeros_like(val_counts)
    used = (val_counts > 0) & (np.asarray(train_counts) > 0)
    weights[used] = 1.0 / val_counts[used]
    return weights


def datamodule_macro_weights(datamodule) -> np.ndarray:
    """:func:`macro_validation_weights` of a module (``early_stopping_monitor="macro_loss"``), or a clear error."""
    try:
        val_counts = datamodule.label_counts("val")
    except ValueError as err:
        raise ValueError(
            f'early_stopping_monitor="macro_loss" weighs validation cells by their label\'s count, which '
            f"{type(datamodule).__name__} does not know before streaming ({err}); use the default "
            '"weighted_loss" instead.'
        ) from err
    return macro_validation_weights(val_counts, datamodule.label_counts("train"))


def datamodule_class_weights(datamodule, class_weights: str | None, n_labels: int) -> np.ndarray | None:
    """Training class weights: the module's stored ``class_weights`` when it has them, else balanced label counts."""
    if class_weights is None:
        return None
    stored = datamodule.class_weights
    if stored is not None:
        stored = np.asarray(stored, dtype=np.float64)
        if stored.shape != (n_labels,):
            raise ValueError(f"The store's class_weights.npy has shape {stored.shape}; expected ({n_labels},).")
        return stored
    return balanced_class_weights(datamodule.label_counts("train"))
