"""Streaming training from a census query: :class:`CensusDataModule` over ``tiledbsoma_ml``."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset

from schce._constants import SCALING_SAMPLE
from schce.data._loader import EpochLoader
from schce.data._protocol import check_batch_size, check_split, check_streaming_options
from schce.data.census._soma import (
    LABEL_COLUMN,
    SCTAB_ASSAYS,
    HCEClassifier,
    _experiment_of,
    _GeneMap,
    _require_soma,
    _require_soma_ml,
    _value_filter,
)
from schce.nn._batch import check_batch_format, csr_batch

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- training
def _cache_soma_ml_kernels() -> None:
    """Let numba cache tiledbsoma-ml's compiled CSR kernels on disk.

    tiledbsoma-ml 0.1.0 compiles them without ``cache=True``: every new process (each DataLoader worker, each epoch,
    since workers are not persistent) would spend seconds to a minute compiling before its first batch.
    """
    try:
        from tiledbsoma_ml import _csr
    except ImportError:  # pragma: no cover - layout of another tiledbsoma-ml version
        return
    for name in ("_csr_merge_inner", "_csr_to_dense_inner", "_coo_to_csr_inner", "_csr_sort_indices"):
        kernel = getattr(_csr, name, None)
        # A numba dispatcher without a cache holds a NullCache; enable_caching() swaps in the on-disk one.
        if hasattr(kernel, "enable_caching") and type(getattr(kernel, "_cache", None)).__name__ == "NullCache":
            kernel.enable_caching()


class _LabelledBatches(IterableDataset):
    """Wraps a ``tiledbsoma_ml.ExperimentDataset``: its ``(X, obs)`` mini-batches become schce training batches."""

    def __init__(
        self,
        dataset,
        positions: np.ndarray,
        n_model: int,
        labels: Sequence[str],
        source_column: str | None = None,
        sources: pd.Index | None = None,
        pair_rows: np.ndarray | None = None,
    ):
        self.dataset = dataset
        # Annotation-aware targets: "target" is pair_rows[index of the cell's source in sources, label code].
        self.source_column, self.sources, self.pair_rows = source_column, sources, pair_rows
        # Sparse X (``return_sparse_X``) becomes a CSR batch when every query column has its own model gene.
        self.sparse = bool(getattr(dataset, "return_sparse_X", False)) and len(np.unique(positions)) == len(positions)
        self.training = bool(dataset.shuffle)
        self.positions, self.n_model = positions, n_model
        self.labels = pd.Index(list(labels))
        self.base_seed, self.epoch = int(dataset.seed), 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        _cache_soma_ml_kernels()  # in a worker process this is the first code that runs
        for X, obs in self.dataset:
            if self.training and len(obs) < 2:
                continue  # a last batch of one cell: BatchNorm cannot train on it
            expression = self._expression(X, len(obs))
            codes = self.labels.get_indexer(obs[LABEL_COLUMN].astype(str))
            if (codes < 0).any():  # the value filter admits model labels only; anything else is a bug upstream
                raise RuntimeError(f"Streamed cells with labels outside the model: {obs[LABEL_COLUMN][codes < 0]}")
            batch = {
                **expression,
                "y": torch.from_numpy(codes.astype(np.int64)),
                "soma_joinid": torch.from_numpy(obs["soma_joinid"].to_numpy().astype(np.int64)),
            }
            if self.pair_rows is not None:
                source = self.sources.get_indexer(obs[self.source_column].astype(str))
                batch["target"] = torch.from_numpy(self.pair_rows[source, codes])
            yield batch

    def _expression(self, X, n: int) -> dict:
        """``{"x": dense}`` or the CSR keys of a batch, in the model's gene order."""
        if sp.issparse(X):
            if self.sparse:
                X = sp.csr_matrix(X)
                if not X.has_canonical_format:
                    X.sum_duplicates()
                return csr_batch(X.indptr, self.positions[X.indices], X.data, self.n_model)
            X = X.toarray()
        X = np.asarray(X, dtype=np.float32).reshape(n, -1)
        if len(self.positions) == self.n_model and np.array_equal(self.positions, np.arange(self.n_model)):
            x = X
        else:
            x = np.zeros((n, self.n_model), dtype=np.float32)
            x[:, self.positions] = X
        return {"x": torch.from_numpy(np.ascontiguousarray(x))}

    def __len__(self) -> int:
        return len(self.dataset)

    def next_epoch(self) -> None:
        """Advance to the next pass (called in the main process before the loader starts its workers)."""
        # tiledbsoma-ml 0.1.0 records the epoch but shuffles with the seed alone, so the order would repeat every
        # epoch: fold the epoch into the seed (the same on every rank, so rank partitions stay disjoint).
        self.dataset.set_epoch(self.epoch)
        self.dataset.seed = (self.base_seed + 1_000_003 * self.epoch) % 2**32
        self.epoch += 1


class CensusDataModule(pl.LightningDataModule):
    """Streams training batches from a census query with ``tiledbsoma_ml.ExperimentDataset``.

    Selects cells with scTab's filters (primary data, :data:`SCTAB_ASSAYS`) whose ``cell_type_ontology_term_id``
    is one of the model's labels: only those train, since the loss needs a label code; cells annotated with finer
    descendant terms are left out of training (score them with :func:`get_query_anndata` and
    :meth:`~schce.HCEClassifier.evaluate`). Counts stream in shuffled I/O batches; memory is bounded by
    ``io_batch_size``, not by the size of the census.

    Batches are ``{"x": (B, n_model_genes) float32 raw counts in model gene order, "y": (B,) int64 codes into
    model.hierarchy.labels, "soma_joinid": (B,) int64}``, with the CSR parts of ``x`` in its place by default
    (``batch_format``).

    Under DDP every rank reads a disjoint, equally sized share of the cells (``ExperimentDataset`` partitions by
    rank and by DataLoader worker; the rank is taken from the Lightning trainer in :meth:`setup`), and every epoch
    reshuffles with ``seed`` and the epoch number.

    Parameters
    ----------
    census
        An opened census (``cellxgene_census.open_soma(census_version=...)``), a local store in the census layout
        (``tiledbsoma.open(path)``), or a ``tiledbsoma.Experiment``.
    model
        The :class:`~schce.HCEClassifier` to train; its labels select the cells and its genes the columns.
    obs_value_filter
        An extra SOMA value filter on ``obs``, combined with ``and``.
    organism
        Experiment under ``census_data`` (ignored when ``census`` is an experiment).
    batch_size
        Cells per training step.
    validation_size
        Fraction of the selected cells held out as a validation set (random, with ``seed``); ``0`` for none.
    primary_only, assays, gene_column, measurement_name, X_name
        As in :func:`get_query_anndata`.
    io_batch_size, shuffle_chunk_size
        ``ExperimentDataset`` read size (cells per read, shuffled together) and shuffle granularity (runs of
        contiguous cells); ``io_batch_size`` must be a multiple of ``shuffle_chunk_size``.
    use_eager_fetch
        Read the next I/O batch in a background thread while the current one trains (hides the latency of the
        remote census).
    num_workers
        DataLoader worker processes (started with ``spawn``, as TileDB needs).
    seed
        Seeds the validation split and the shuffle; the same on every rank.
    source_column
        ``obs`` column naming each cell's annotation source, read by :meth:`annotation_targets`
        (``loss="hce-aware"``).
    batch_format
        ``"auto"`` / ``"sparse"`` (default): batches carry the CSR parts of ``x`` (``x_indptr``, ``x_indices``,
        ``x_values``, ``x_shape``), densified by the model on its device; ``"dense"``: batches carry ``"x"``.

    Attributes
    ----------
    n_train, n_validation
        Selected cells in each split.

    The module implements :class:`~schce.data.HCEDataModule`: :meth:`label_counts` gives the training cells per
    model label (for class weights).
    """

    #: Streamed: nothing is held in memory for full-batch training; no stored class weights; no batch codes.
    n_values = None
    class_weights = None
    n_batches = 1

    def __init__(  # long: one open census query serves the checks, the split, the label counts and label usage
        self,
        census,
        model: HCEClassifier,
        obs_value_filter: str | None = None,
        organism: str = "homo_sapiens",
        batch_size: int = 2048,
        validation_size: float = 0.0,
        *,
        primary_only: bool = True,
        assays: Sequence[str] | None = SCTAB_ASSAYS,
        gene_column: str | None = None,
        measurement_name: str = "RNA",
        X_name: str = "raw",
        io_batch_size: int = 65_536,
        shuffle_chunk_size: int = 64,
        use_eager_fetch: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        source_column: str = "dataset_id",
        batch_format: str = "auto",
    ):
        super().__init__()
        check_batch_format(batch_format)
        tiledbsoma = _require_soma()
        ml = _require_soma_ml()
        _cache_soma_ml_kernels()
        check_batch_size(batch_size)
        if not 0 <= validation_size < 1:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        if io_batch_size % shuffle_chunk_size:
            raise ValueError(
                f"io_batch_size ({io_batch_size}) must be a multiple of shuffle_chunk_size ({shuffle_chunk_size})."
            )
        exp = _experiment_of(census, tiledbsoma, organism, measurement_name, X_name)
        self.genes = _GeneMap(exp, measurement_name, model, gene_column)
        self.labels = tuple(model.hierarchy.labels)
        self.value_filter = _value_filter(self.labels, primary_only, assays, obs_value_filter)
        with exp.axis_query(
            measurement_name,
            obs_query=tiledbsoma.AxisQuery(value_filter=self.value_filter),
            var_query=tiledbsoma.AxisQuery(coords=(self.genes.joinids,)),
        ) as query:
            obs_names = exp.obs.schema.names
            if source_column not in obs_names:
                raise ValueError(
                    f"source_column={source_column!r} is not a census obs column; choose one of {obs_names}."
                )
            columns = list(dict.fromkeys(["soma_joinid", LABEL_COLUMN, source_column]))
            obs = query.obs(column_names=columns).concat().to_pandas()
            if len(obs) < 2:
                raise ValueError(f"{len(obs)} census cell(s) match {self.value_filter[:500]}; training needs more.")
            # Built once here (it reads the joinids); setup() copies it per rank.
            base = ml.ExperimentDataset(
                query,
                layer_name=X_name,
                obs_column_names=columns,
                batch_size=batch_size,
                io_batch_size=io_batch_size,
                shuffle=True,
                shuffle_chunk_size=shuffle_chunk_size,
                seed=seed,
                use_eager_fetch=use_eager_fetch,
                # CSR batches straight from the SOMA reads: no dense batch on the host ("auto" and "sparse").
                return_sparse_X=batch_format != "dense",
            )
        # X columns arrive in the query's var order; place them at the model's gene positions.
        var_order = base.query_ids.var_joinids
        self._positions = self.genes.positions[pd.Index(self.genes.joinids).get_indexer(var_order)]
        if validation_size > 0:
            self._base_train, self._base_validation = base.random_split(1 - validation_size, validation_size, seed=seed)
        else:
            self._base_train, self._base_validation = base, None
        train_ids = self._base_train.query_ids.obs_joinids
        in_train = obs["soma_joinid"].isin(train_ids).to_numpy()
        codes = pd.Index(self.labels).get_indexer(obs[LABEL_COLUMN].astype(str)[in_train])
        self._train_counts = np.bincount(codes, minlength=len(self.labels))
        # Which labels each source uses among the selected (training and validation) cells: from obs only.
        sources = obs[source_column].astype(str).to_numpy()
        self.source_column, self._sources = source_column, pd.Index(np.unique(sources))
        self._used = np.zeros((len(self._sources), len(self.labels)), dtype=bool)
        self._used[
            self._sources.get_indexer(sources), pd.Index(self.labels).get_indexer(obs[LABEL_COLUMN].astype(str))
        ] = True
        self.pair_rows: np.ndarray | None = None  # set by annotation_targets
        self.n_train = len(train_ids)
        self.n_validation = 0 if self._base_validation is None else len(self._base_validation.query_ids.obs_joinids)
        self.batch_size, self.io_batch_size, self.shuffle_chunk_size = batch_size, io_batch_size, shuffle_chunk_size
        self.num_workers, self.seed = num_workers, seed
        self._train: _LabelledBatches | None = None
        self._validation: _LabelledBatches | None = None
        logger.info(
            "Census query: %d training and %d validation cells, %d of %d model genes found.",
            self.n_train,
            self.n_validation,
            len(self.genes.positions),
            self.genes.n_model,
        )

    @property
    def n_genes(self) -> int:
        """Genes per cell: the model's."""
        return self.genes.n_model

    def n_cells(self, split: str) -> int:
        """Selected cells in a split (no test split: score held-out cells with :func:`get_query_anndata`)."""
        check_split(split)
        return {"train": self.n_train, "val": self.n_validation, "test": 0}[split]

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Training cells per model label (other splits are not counted ahead of streaming)."""
        if split != "train":
            raise ValueError(f"The census module counts the training labels only, not {split!r}.")
        return self._train_counts

    def scaling_loader(self):
        """The training loader; the runner stops after :data:`~schce._constants.SCALING_SAMPLE` cells."""
        return self.train_dataloader(), SCALING_SAMPLE

    def annotation_targets(self, hierarchy, label_semantics: str) -> np.ndarray:
        """Acceptable-label masks from the selected cells' ``obs``; training and validation batches carry ``"target"``.

        Read from the label and ``source_column`` of every selected cell when the module was built (no expression):
        the same masks on every rank (see :meth:`~schce.hierarchy.Hierarchy.annotation_masks`).
        """
        if list(hierarchy.labels) != list(self.labels):
            raise ValueError("annotation_targets needs the hierarchy of the model this module was built for.")
        masks, self.pair_rows = hierarchy.annotation_masks(self._used, label_semantics)
        self._train = self._validation = None  # rebuilt with the targets
        logger.info(
            "Annotation-aware targets (%s) from %d %s sources: %d distinct acceptable-label sets.",
            label_semantics,
            len(self._sources),
            self.source_column,
            len(masks),
        )
        return masks

    def check_train_options(self, batch_terms: bool, augment: bool) -> None:
        """Refuse ``augment=True`` (nothing is built from streamed cells) and batch terms without two batches."""
        check_streaming_options(self, batch_terms, augment)

    def resumable_order(self) -> None:
        """A resumed run restarts the interrupted epoch's order."""
        return None

    def read_obs(self, split: str) -> pd.DataFrame:
        """No per-cell metadata is kept (batches are scored by position)."""
        check_split(split)
        return pd.DataFrame()

    def test_dataloader(self) -> list:
        """No test split (an empty list)."""
        return []

    def _dataset(self, base, shuffle: bool) -> _LabelledBatches:
        from attrs import evolve

        ds = evolve(base, shuffle=shuffle)
        if self.trainer is not None:
            # ExperimentDataset takes the rank from LOCAL_RANK under Lightning, which repeats across nodes: use the
            # trainer's global rank and world size.
            ds.rank, ds.world_size = int(self.trainer.global_rank), int(self.trainer.world_size)
        return _LabelledBatches(
            ds, self._positions, self.genes.n_model, self.labels, self.source_column, self._sources, self.pair_rows
        )

    def setup(self, stage: str | None = None) -> None:
        """Build the per-rank datasets (called by Lightning on every rank after the process group starts)."""
        self._train = self._dataset(self._base_train, shuffle=True)
        if self._base_validation is not None:
            self._validation = self._dataset(self._base_validation, shuffle=False)

    def _loader(self, ds: _LabelledBatches) -> DataLoader:
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available()}
        if self.num_workers > 0:
            kwargs["multiprocessing_context"] = "spawn"
        return EpochLoader(ds, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        if self._train is None:
            self.setup("fit")
        return self._loader(self._train)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in store order (an empty list without a validation split)."""
        if self._train is None:
            self.setup("fit")
        return [] if self._validation is None else self._loader(self._validation)
