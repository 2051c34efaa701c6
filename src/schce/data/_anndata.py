"""In-memory (or backed) AnnData as a data module: the split, its loaders and the annotation-aware targets."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from schce._constants import EVAL_BATCH_SIZE
from schce.data._genes import GeneAligner
from schce.data._loader import make_loader
from schce.data._protocol import check_batch_size, check_batch_terms, check_split

logger = logging.getLogger(__name__)


class AnnDataModule(pl.LightningDataModule):
    """Rows of an expression matrix, split into training, validation and test cells, as a :class:`HCEDataModule`.

    This is how :meth:`~schce.HCEClassifier.train` and :meth:`~schce.HCEClassifier.fine_tune` feed AnnData to the
    same training code as the store and census modules. Training batches come in an order fixed by
    ``(seed, epoch)`` (resumable mid-epoch, sharded under DDP); validation and test batches hold
    ``EVAL_BATCH_SIZE`` cells in row order.

    Parameters
    ----------
    X
        Cells × genes expression (dense, sparse or backed), rows indexed by ``codes``.
    codes
        Every row's label code (an index into ``labels``).
    labels
        The model's labels (the code order).
    train, validation, test
        Row indices of each split.
    batch_size
        Training cells per batch (at least 2).
    seed
        Seeds the order of the training batches.
    num_workers
        DataLoader workers.
    aligner
        Maps the rows' genes onto the model's (``None``: ``X`` is in the model's gene order already).
    batches
        Every row's batch code, yielded as ``"batch"`` for the batch terms; ``None`` for none.
    n_batches
        Distinct batch codes.
    sources
        Every row's annotation source, read by :meth:`annotation_targets` (``None``: one source).
    obs
        Cell metadata returned by :meth:`read_obs` (row order of ``X``).
    groups
        Every row's split group (``train(split_key=...)``): where ``augment=True`` learns batch shifts when there are
        no ``sources``.
    batch_format
        ``"auto"`` (sparse batches for an in-memory scipy sparse ``X``), ``"sparse"`` or ``"dense"``
        (:func:`~schce.data.make_loader`).
    """

    def __init__(
        self,
        X,
        codes: np.ndarray,
        labels: Sequence[str],
        train: np.ndarray,
        validation: np.ndarray,
        test: np.ndarray | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        aligner: GeneAligner | None = None,
        batches: np.ndarray | None = None,
        n_batches: int = 1,
        sources: np.ndarray | None = None,
        obs: pd.DataFrame | None = None,
        batch_format: str = "auto",
        groups: np.ndarray | None = None,
    ):
        super().__init__()
        check_batch_size(batch_size)
        self.batch_format = batch_format
        self.X, self.codes, self.labels = X, np.asarray(codes), list(labels)
        self.rows = {
            "train": np.asarray(train),
            "val": np.asarray(validation),
            "test": np.asarray([] if test is None else test, dtype=np.int64),
        }
        self.batch_size, self.seed, self.num_workers = int(batch_size), int(seed), num_workers
        self.aligner, self.batches, self.n_batches, self.sources = aligner, batches, int(n_batches), sources
        self.obs, self.groups = obs, groups
        self.n_genes = aligner.n_model if aligner is not None else int(X.shape[1])
        self.n_values = int(X.shape[0]) * self.n_genes
        self.class_weights = None  # balanced weights come from label_counts
        self.targets: np.ndarray | None = None
        self._loaders: dict[str, DataLoader] = {}

    def n_cells(self, split: str) -> int:
        """Cells in a split."""
        check_split(split)
        return len(self.rows[split])

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Cells per label code in a split."""
        check_split(split)
        return np.bincount(self.codes[self.rows[split]], minlength=len(self.labels))

    def annotation_targets(self, hierarchy, label_semantics: str) -> np.ndarray:
        """Acceptable-label masks read from the training and validation cells; batches then carry ``"target"``."""
        # What a label means is read from the cells the model learns from (training and validation).
        seen = np.concatenate([self.rows["train"], self.rows["val"]])
        seen_sources = self.sources[seen] if self.sources is not None else None
        masks, seen_rows = hierarchy.annotation_targets(self.codes[seen], seen_sources, label_semantics)
        self.targets = np.full(len(self.codes), -1, dtype=np.int64)
        self.targets[seen] = seen_rows
        self._loaders.clear()
        logger.info("Annotation-aware targets (%s): %d distinct acceptable-label sets.", label_semantics, len(masks))
        return masks

    def check_train_options(self, batch_terms: bool, augment: bool) -> None:
        """Batch terms need a registered ``batch_key`` with two batches or more; ``augment=True`` needs shifts.

        Shifts are learnt between batches, or between the ``split_key`` groups when no ``batch_key`` was registered.
        """
        if batch_terms and self.sources is None and self.n_batches < 2:
            raise ValueError(
                "adversarial_weight and batch_mixing_weight act on batches, but no batch_key was registered: "
                "call HCEClassifier.setup_anndata(adata, ..., batch_key='batch') first."
            )
        check_batch_terms(self.n_batches, batch_terms)
        if augment and self.sources is None and self.groups is None:
            raise ValueError(
                "augment=True learns batch shifts from differences between batches: register a batch_key in "
                "setup_anndata, pass split_key, or pass a ready augmentation matrix."
            )

    def shift_sources(self) -> np.ndarray | None:
        """Where batch shifts are learnt (augmentation): the annotation sources (batches), else the split groups."""
        return self.sources if self.sources is not None else self.groups

    def scaling_loader(self):
        """All training cells (no gene alignment: the scaling is fitted on registered data), and no cap.

        Dense batches: the sums of sparse ones differ in the last bits, and the scaling of in-memory and backed
        copies of the same data must be the same.
        """
        return make_loader(self.X, self.rows["train"], EVAL_BATCH_SIZE, batch_format="dense"), None

    def resumable_order(self):
        """The training loader's sampler and what a resumed run must share with this one."""
        fingerprint = {
            "seed": self.seed,
            "n_train": self.n_cells("train"),
            "n_validation": self.n_cells("val"),
            "batch_size": self.batch_size,
        }
        return self.train_dataloader().sampler, fingerprint

    def read_obs(self, split: str) -> pd.DataFrame:
        """Metadata of a split's cells in batch order, indexed by position (the batches carry no ``"idx"``)."""
        check_split(split)
        rows = self.rows[split]
        if self.obs is None:
            return pd.DataFrame(index=pd.RangeIndex(len(rows)))
        return self.obs.iloc[rows].reset_index(drop=True)

    def _loader(self, split: str) -> DataLoader:
        # Built once per split, so the sampler that resumes training is the one Lightning iterates.
        if split not in self._loaders:
            train = split == "train"
            self._loaders[split] = make_loader(
                self.X,
                self.rows[split],
                self.batch_size if train else EVAL_BATCH_SIZE,
                self.codes,
                shuffle=train,
                aligner=self.aligner,
                seed=self.seed if train else None,
                num_workers=self.num_workers,
                batches=self.batches if train else None,
                targets=self.targets,
                batch_format=self.batch_format,
            )
        return self._loaders[split]

    def train_dataloader(self) -> DataLoader:
        """Training batches, shuffled by ``(seed, epoch)``."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in row order (an empty list without validation cells)."""
        return self._loader("val") if len(self.rows["val"]) else []

    def test_dataloader(self) -> DataLoader | list:
        """Test batches in row order (an empty list without test cells)."""
        return self._loader("test") if len(self.rows["test"]) else []
