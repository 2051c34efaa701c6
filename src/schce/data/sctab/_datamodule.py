"""Streaming scTab stores (either layout) into training: row groups, a shuffle buffer, worker and rank shards."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from schce._constants import SCALING_SAMPLE
from schce._memory import release_free_memory
from schce.data._loader import EpochLoader
from schce.data._protocol import check_batch_size, check_split, check_streaming_options
from schce.data.sctab._format import (
    CODE_COLUMNS,
    label_usage,
    part_codec,
    read_lookup,
    read_var,
    split_parts,
    store_layout,
)
from schce.data.sctab._read import _Block, _read_block
from schce.nn._batch import check_batch_format, csr_batch

logger = logging.getLogger(__name__)


def _new_batch(n: int, n_genes: int) -> torch.Tensor:
    """A zeroed float32 batch; in a DataLoader worker it is created in shared memory so it is not copied again."""
    if get_worker_info() is None:
        return torch.zeros((n, n_genes), dtype=torch.float32)
    x = _shared(n * n_genes, torch.float32)  # new shared memory is zero-filled by the OS
    return torch.zeros((n, n_genes), dtype=torch.float32) if x is None else x.view(n, n_genes)


def _new_array(n: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-d tensor; in a DataLoader worker in shared memory, so sending the batch does not copy it.

    In this process it is numpy's (which asks for huge pages on large arrays: fewer page faults than torch.empty).
    """
    x = None if get_worker_info() is None else _shared(n, dtype)
    return torch.from_numpy(np.empty(n, dtype=str(dtype).removeprefix("torch."))) if x is None else x


def _shared(n: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A tensor of ``n`` elements over new shared memory (``None`` where torch's private API to make one is missing)."""
    try:
        storage = torch.UntypedStorage._new_shared(max(n, 1) * dtype.itemsize)
    except (AttributeError, RuntimeError):  # a private torch API: the batch is then copied when it is sent
        return None
    return torch.tensor([], dtype=dtype).set_(storage)[:n]


class StoreDataset(IterableDataset):
    """Batches of one split of a scTab store, in row-group units.

    Each epoch the split's row groups are permuted with ``(seed, epoch)`` (when shuffling), optionally subsampled
    (``sub_sample_frac``), dealt to DDP ranks (``unit % world_size``) and then to DataLoader workers; each worker
    reads ``buffer_size`` row groups at a time and emits batches of rows shuffled across them (rows left over join
    the next buffer). Shards never overlap and together cover the (subsampled) split.

    With several ranks in training (``even_batches``) every rank yields the same number of full batches (DDP needs
    equal steps): a worker stops after as many full batches as the same worker of the smallest rank holds, which skips
    at most about one row group plus one batch per worker and rank each epoch. Otherwise every cell is yielded once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        split: str,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        buffer_size: int = 8,
        sub_sample_frac: float = 1.0,
        batch_column: str | None = None,
        num_workers: int = 0,
        shard_ranks: bool = True,
        even_batches: bool = True,
        batch_format: str = "auto",
    ):
        self.path, self.split = str(path), split
        self.layout = store_layout(path)
        check_batch_format(batch_format)
        # Sparse batches where they are the faster read: the compact layout stores CSR rows already.
        self.sparse = batch_format == "sparse" or (batch_format == "auto" and self.layout != "dense")
        self.n_genes = pq.read_metadata(Path(path) / "var.parquet").num_rows  # the rows of read_var, not read
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.buffer_size, self.sub_sample_frac, self.batch_column = buffer_size, sub_sample_frac, batch_column
        self.num_workers, self.shard_ranks, self.even_batches = num_workers, shard_ranks, even_batches
        self.units: list[tuple[str, int, int]] = []
        for part in split_parts(path, split):
            meta = pq.ParquetFile(part).metadata
            self.units += [(str(part), g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self.unit_rows = np.array([u[2] for u in self.units], dtype=np.int64)
        self.epoch = 0
        self._passes = 0  # passes begun; the next one is epoch self._passes
        self.rank: int | None = None  # None: from torch.distributed when initialised
        self.world_size: int | None = None
        # Annotation-aware targets: a batch's "target" is pair_rows[source code, cell_type code].
        self.source_column: str | None = None
        self.pair_rows: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        """Cells in the split."""
        return int(self.unit_rows.sum())

    def _rank_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def next_epoch(self) -> None:
        """Start the next pass (called by the loader in the main process, before its workers copy the dataset)."""
        self.epoch, self._passes = self._passes, self._passes + 1

    def epoch_units(self, epoch: int | None = None) -> np.ndarray:
        """Row-group indices of an epoch (default: the current one), in reading order, before sharding."""
        n = len(self.units)
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            order = np.arange(n)
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        if self.sub_sample_frac < 1:
            order = order[: max(1, int(round(self.sub_sample_frac * n)))]
        return order

    def shard(self, rank: int, world: int, worker: int, n_workers: int, epoch: int | None = None) -> np.ndarray:
        """Row-group indices read by ``worker`` of ``rank`` in an epoch (default: the current one)."""
        units = self.epoch_units(epoch)
        if self.shard_ranks:
            units = units[rank::world]
        return units[worker::n_workers]

    def _worker_batches(self, rank: int, world: int, worker: int, n_workers: int, epoch: int) -> int:
        rows = int(self.unit_rows[self.shard(rank, world, worker, n_workers, epoch)].sum())
        if self._equal_steps(world):
            return min(
                int(self.unit_rows[self.shard(r, world, worker, n_workers, epoch)].sum()) // self.batch_size
                for r in range(world)
            )
        full, rest = divmod(rows, self.batch_size)
        return full + (rest > 1 or (rest == 1 and not self.shuffle))

    def _equal_steps(self, world: int) -> bool:
        return world > 1 and self.shard_ranks and self.shuffle and self.even_batches

    def __len__(self) -> int:
        rank, world = self._rank_world()
        n_workers = max(1, self.num_workers)
        return sum(self._worker_batches(rank, world, w, n_workers, self.epoch) for w in range(n_workers))

    def _columns(self) -> list[str]:
        cols = ["cell_type", "idx"]
        for extra in (self.batch_column, self.source_column if self.pair_rows is not None else None):
            if extra is not None and extra not in cols:
                cols.append(extra)
        return cols

    def __iter__(self):
        # The epoch is read now: the loader advances it right after creating this iterator.
        return self._iter(self.epoch)

    def _iter(self, epoch: int):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        units = self.shard(rank, world, worker, n_workers, epoch)
        cap = self._worker_batches(rank, world, worker, n_workers, epoch)
        rng = np.random.default_rng([self.seed, epoch, rank, worker])
        files: dict[str, tuple] = {}  # an open part and its codec, read once
        pending: list[tuple[_Block, np.ndarray]] = []
        emitted = 0
        try:
            for start in range(0, len(units), self.buffer_size):
                for u in units[start : start + self.buffer_size]:
                    file, group, _ = self.units[u]
                    if file not in files:
                        pf = pq.ParquetFile(file)
                        files[file] = pf, part_codec(pf) if self.layout != "dense" else None
                    pf, codec = files[file]
                    block = _read_block(pf, group, self.layout, self.n_genes, self._columns(), codec)
                    pending.append((block, np.arange(len(block))))
                ids = np.concatenate([np.full(len(r), k) for k, (_, r) in enumerate(pending)])
                rows = np.concatenate([r for _, r in pending])
                if self.shuffle:
                    perm = rng.permutation(len(rows))
                    ids, rows = ids[perm], rows[perm]
                n_full = len(rows) // self.batch_size
                for b in range(n_full):
                    if emitted >= cap:
                        return
                    sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
                    yield self._assemble(pending, ids[sl], rows[sl])
                    emitted += 1
                left_ids, left_rows = ids[n_full * self.batch_size :], rows[n_full * self.batch_size :]
                # The cells left for the next round are copied out of their row groups: a row group kept whole for
                # a few of its cells lived several rounds, and on a dense store (80 MB per row group) a worker's
                # memory grew by ~2 GiB over a 75,000-cell epoch (docs/atlas.md).
                carried = [pending[k][0].take(left_rows[left_ids == k]) for k in np.unique(left_ids)]
                pending, block = [(b, np.arange(len(b))) for b in carried], None
            if pending and emitted < cap:
                ids = np.concatenate([np.full(len(r), k) for k, (_, r) in enumerate(pending)])
                rows = np.concatenate([r for _, r in pending])
                yield self._assemble(pending, ids, rows)
        finally:
            # A worker lives on after its last batch until the whole loader ends, and Lightning validates before
            # that: the row groups it buffered (~1 GiB at batch 2048 on a dense store) would sit beside the
            # validation workers.
            pending = files = block = None
            if get_worker_info() is not None:
                release_free_memory()

    def _assemble(self, pool: list[tuple[_Block, np.ndarray]], ids: np.ndarray, rows: np.ndarray) -> dict:
        n = len(rows)
        cols = {c: np.empty(n, dtype=np.int64) for c in self._columns()}
        parts = [(np.flatnonzero(ids == k), pool[k][0]) for k in np.unique(ids)]
        for dest, block in parts:
            for c in cols:
                cols[c][dest] = block.column(c)[rows[dest]]
        batch = self._csr(parts, rows, n) if self.sparse else {"x": self._dense(parts, rows, n)}
        batch.update(y=torch.from_numpy(cols["cell_type"]), idx=torch.from_numpy(cols["idx"]))
        if self.batch_column is not None:
            batch["batch"] = torch.from_numpy(cols[self.batch_column])
        if self.pair_rows is not None:
            batch["target"] = torch.from_numpy(self.pair_rows[cols[self.source_column], cols["cell_type"]])
        return batch

    def _dense(self, parts: list, rows: np.ndarray, n: int) -> torch.Tensor:
        x = _new_batch(n, self.n_genes)
        x_np = x.numpy()
        for dest, block in parts:
            block.write_rows(rows[dest], x_np, dest)
        return x

    def _csr(self, parts: list, rows: np.ndarray, n: int) -> dict:
        lens = np.zeros(n, dtype=np.int64)
        for dest, block in parts:
            lens[dest] = block.row_lengths(rows[dest])
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=indptr[1:])
        # Written in place: in a DataLoader worker these are in shared memory, which the batch is sent through.
        indices, values = _new_array(int(indptr[-1]), torch.int32), _new_array(int(indptr[-1]), torch.float32)
        for dest, block in parts:
            block.write_csr(rows[dest], indptr, dest, indices.numpy(), values.numpy())
        return csr_batch(indptr, indices, values, self.n_genes)


class SCTabStoreDataModule(pl.LightningDataModule):
    """Train, validation and test batches from a scTab store, in the published dense layout or the compact one.

    Batches are ``{"x": float32 (B, n_genes), "y": int64 cell_type codes, "idx": int64 store row ids}`` (or the CSR
    parts of ``x`` instead of it, see ``batch_format``) plus
    ``"batch"`` (codes of ``batch_column``) when asked. ``y`` indexes ``categorical_lookup/cell_type.parquet``,
    which is the label order of :meth:`schce.HCEClassifier.from_sctab_store`. Memory stays bounded by the shuffle
    buffer (``buffer_size`` row groups of 1024 cells per worker), whatever the store's size.

    Parameters
    ----------
    path
        Store directory (:func:`write_sctab_store`, :func:`convert_sctab_store` or scTab's published store).
    batch_size
        Training cells per batch (scTab: 2048).
    num_workers
        DataLoader worker processes; row groups are dealt to them without overlap.
    sub_sample_frac
        Fraction of the training row groups used each epoch, drawn anew every epoch (as scTab's option).
    seed
        Seeds the row-group order and the in-buffer shuffle of every epoch.
    buffer_size
        Row groups read and shuffled together by each worker.
    batch_column
        Code column to yield as ``batch`` (e.g. ``"dataset_id"``), for batch-aware losses.
    source_column
        Code column naming each cell's annotation source, read by :meth:`annotation_targets` (``loss="hce-aware"``).
    eval_batch_size
        Cells per validation / test batch; default ``batch_size``.
    pin_memory
        Page-locked batches for faster GPU copies; default: when CUDA is available.
    batch_format
        ``"sparse"``: batches carry CSR parts (``x_indptr``, ``x_indices``, ``x_values``, ``x_shape``) that the model
        densifies on its device into a reused buffer; ``"dense"``: batches carry ``"x"``; ``"auto"`` (default):
        sparse for the compact layout (its rows are CSR already: 4.7-5.2× the fresh dense batches' rate in
        ``benchmarks/loader_throughput.py``), dense for the published dense layout.

    Notes
    -----
    Training row groups are dealt to DDP ranks (rank from the trainer, else ``torch.distributed``), then to
    workers. Validation and test are dealt to workers only: every rank scores the whole split, so early stopping
    sees the same metric everywhere.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int = 2048,
        num_workers: int = 2,
        sub_sample_frac: float = 1.0,
        seed: int = 0,
        buffer_size: int = 8,
        batch_column: str | None = None,
        eval_batch_size: int | None = None,
        pin_memory: bool | None = None,
        source_column: str = "dataset_id",
        batch_format: str = "auto",
    ):
        super().__init__()
        check_batch_size(batch_size)
        self.batch_format = check_batch_format(batch_format)
        if not 0 < sub_sample_frac <= 1:
            raise ValueError(f"sub_sample_frac must be in (0, 1], got {sub_sample_frac}.")
        if num_workers < 0 or buffer_size < 1:
            raise ValueError(f"num_workers must be >= 0 and buffer_size >= 1, got {num_workers} and {buffer_size}.")
        self.path = Path(path)
        self.layout = store_layout(path)
        if batch_column is not None and batch_column not in CODE_COLUMNS:
            raise ValueError(
                f"batch_column must be one of the store's code columns {CODE_COLUMNS}, got {batch_column!r}."
            )
        if source_column not in CODE_COLUMNS:
            raise ValueError(
                f"source_column must be one of the store's code columns {CODE_COLUMNS}, got {source_column!r}."
            )
        self.source_column = source_column
        self.pair_rows: np.ndarray | None = None  # set by annotation_targets
        self.var = read_var(path)
        self.labels = read_lookup(path, "cell_type")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.sub_sample_frac, self.buffer_size, self.batch_column = sub_sample_frac, buffer_size, batch_column
        self.eval_batch_size = eval_batch_size or batch_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        weights = self.path / "class_weights.npy"
        self.class_weights = np.load(weights) if weights.is_file() else None
        self._datasets: dict[str, StoreDataset] = {}

    @property
    def n_genes(self) -> int:
        """Genes per cell."""
        return len(self.var)

    @property
    def n_batches(self) -> int:
        """Number of ``batch_column`` codes (1 without one)."""
        return 1 if self.batch_column is None else len(read_lookup(self.path, self.batch_column))

    #: Streamed from disk: nothing is held in memory for full-batch training.
    n_values = None

    @property
    def child_matrix(self) -> np.ndarray | None:
        """``cell_type_hierarchy/child_matrix.npy`` (ancestor rows, descendant-or-self columns), when present."""
        f = self.path / "cell_type_hierarchy" / "child_matrix.npy"
        return np.load(f) if f.is_file() else None

    def dataset(self, split: str) -> StoreDataset:
        """The :class:`StoreDataset` of a split (created once)."""
        check_split(split)
        if split not in self._datasets:
            train = split == "train"
            self._datasets[split] = StoreDataset(
                self.path,
                split,
                self.batch_size if train else self.eval_batch_size,
                shuffle=train,
                seed=self.seed,
                buffer_size=self.buffer_size if train else 1,
                sub_sample_frac=self.sub_sample_frac if train else 1.0,
                batch_column=self.batch_column,
                num_workers=self.num_workers,
                shard_ranks=train,
                batch_format=self.batch_format,
            )
            self._set_targets(self._datasets[split])
        return self._datasets[split]

    def _set_targets(self, ds: StoreDataset) -> None:
        # Training and validation cells carry targets (their label meanings were read); test cells need none.
        if ds.split != "test":
            ds.source_column, ds.pair_rows = self.source_column, self.pair_rows

    def scaling_loader(self) -> tuple[DataLoader, int]:
        """Training batches to estimate the gene scaling from, and the cells to read (:data:`SCALING_SAMPLE`).

        Read in this process, one shuffled row group at a time, as sparse batches whose stored values alone are
        summed (:func:`~schce.nn._module.gene_moments`): a pass through the worker loader left the training epoch
        1.9 GiB higher (summed over its workers) on the 200,000-cell benchmark store.
        """
        train = self.dataset("train")
        sample = StoreDataset(
            train.path, "train", train.batch_size, shuffle=True, seed=train.seed, buffer_size=1, batch_format="sparse"
        )
        return DataLoader(sample, batch_size=None, num_workers=0), SCALING_SAMPLE

    def annotation_targets(self, hierarchy, label_semantics: str) -> np.ndarray:
        """Acceptable-label masks from the training and validation cells; their batches then carry ``"target"``.

        Reads only the ``cell_type`` and ``source_column`` codes of the ``train`` and ``val`` parts, one row group at
        a time (:func:`~schce.hierarchy.Hierarchy.annotation_masks`): the same masks on every DDP rank, and the
        same as :meth:`~schce.hierarchy.Hierarchy.annotation_targets` on these cells in memory.
        """
        used = label_usage(self.path, self.source_column, n_labels=hierarchy.n_labels)
        masks, self.pair_rows = hierarchy.annotation_masks(used, label_semantics)
        for ds in self._datasets.values():
            self._set_targets(ds)
        logger.info(
            "Annotation-aware targets (%s) from %d %s sources: %d distinct acceptable-label sets.",
            label_semantics,
            int(used.any(axis=1).sum()),
            self.source_column,
            len(masks),
        )
        return masks

    def resumable_order(self) -> None:
        """A resumed run restarts the interrupted epoch's row-group order."""
        return None

    def n_cells(self, split: str) -> int:
        """Cells in a split."""
        return self.dataset(split).n_cells

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Cells per ``cell_type`` code in a split (reads only that column)."""
        counts = np.zeros(len(self.labels), dtype=np.int64)
        for part in split_parts(self.path, split):
            codes = pq.read_table(part, columns=["cell_type"]).column("cell_type").to_numpy()
            counts += np.bincount(codes, minlength=len(self.labels))[: len(self.labels)]
        return counts

    def check_train_options(self, batch_terms: bool, augment: bool) -> None:
        """Refuse ``augment=True`` (nothing is built from streamed cells) and batch terms without two batches."""
        check_streaming_options(self, batch_terms, augment)

    def read_obs(self, split: str, columns=CODE_COLUMNS) -> pd.DataFrame:
        """The split's code columns decoded to labels (categoricals), indexed by the store's ``idx``."""
        frames = [pq.read_table(p, columns=[*columns, "idx"]).to_pandas() for p in split_parts(self.path, split)]
        obs = pd.concat(frames, ignore_index=True)
        for c in columns:
            obs[c] = pd.Categorical.from_codes(obs[c].to_numpy(), categories=read_lookup(self.path, c))
        return obs.set_index("idx")

    def _loader(self, split: str) -> DataLoader:
        ds = self.dataset(split)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            ds.rank, ds.world_size = trainer.global_rank, trainer.world_size
        return EpochLoader(ds, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (row groups re-drawn every epoch)."""
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches in store order per worker."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test batches in store order per worker."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test batches."""
        return self._loader("test")
