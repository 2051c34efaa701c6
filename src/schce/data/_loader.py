"""Torch datasets and loaders over AnnData rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from schce.data._expression import read_rows
from schce.data._genes import GeneAligner
from schce.nn._batch import check_batch_format, csr_batch


class _RowBatches(Dataset):
    """Items are whole batches: one read per batch of row indices (fast for sparse and backed matrices)."""

    def __init__(
        self,
        X,
        rows: np.ndarray,
        labels: np.ndarray | None = None,
        aligner: GeneAligner | None = None,
        batches: np.ndarray | None = None,
        targets: np.ndarray | None = None,
        batch_format: str = "auto",
    ):
        self.X, self.rows, self.labels, self.aligner, self.batches = X, np.asarray(rows), labels, aligner, batches
        self.targets = targets
        self.columns = _sparse_columns(X, aligner, check_batch_format(batch_format))
        self.n_genes = aligner.n_model if aligner is not None else int(X.shape[1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(positions)]
        if self.columns is not None:
            item = _csr_rows(self.X, rows, self.columns, self.n_genes)
        else:
            x = read_rows(self.X, rows)
            if self.aligner is not None:
                x = self.aligner.transform(x)
            item = {"x": torch.from_numpy(x)}
        if self.labels is not None:
            item["y"] = torch.from_numpy(self.labels[rows].astype(np.int64))
        if self.batches is not None:
            item["batch"] = torch.from_numpy(self.batches[rows].astype(np.int64))
        if self.targets is not None:
            item["target"] = torch.from_numpy(self.targets[rows].astype(np.int64))
        return item


def _sparse_columns(X, aligner: GeneAligner | None, batch_format: str) -> np.ndarray | None:
    """Model column of every column of ``X`` (``-1``: not a model gene) when batches are to be sparse, else ``None``.

    Sparse batches need an in-memory scipy matrix and an aligner that maps each query column to one model gene at
    most; ``"auto"`` chooses them then (a CSR row read skips densifying on the host), ``"sparse"`` requires them.
    """
    if batch_format == "dense":
        return None
    n_cols = int(X.shape[1])
    if aligner is None or aligner.identity:
        columns = np.arange(n_cols)
    else:
        found = np.flatnonzero(aligner.index >= 0)
        columns = np.full(n_cols, -1, dtype=np.int64)
        columns[aligner.index[found]] = found
        if (columns >= 0).sum() != len(found):  # a query column feeding several model genes: dense only
            columns = None
    if columns is None or not isinstance(X, sp.spmatrix | sp.sparray):
        if batch_format == "sparse":
            raise ValueError(
                "batch_format='sparse' needs an in-memory scipy sparse X whose genes map one to one onto the model's; "
                "use batch_format='auto' or 'dense' for dense, backed or duplicated-gene data."
            )
        return None
    return columns


def _csr_rows(X, rows: np.ndarray, columns: np.ndarray, n_genes: int) -> dict:
    """A sparse batch of ``X[rows]`` (requested order) with its columns mapped to model genes by ``columns``."""
    block = sp.csr_matrix(X[rows])
    if not block.has_canonical_format:
        block.sum_duplicates()  # as ``toarray`` adds duplicate entries
    genes = columns[block.indices]
    keep = genes >= 0
    if keep.all():
        return csr_batch(block.indptr, genes, block.data, n_genes)
    kept = np.concatenate([[0], np.cumsum(keep)])
    return csr_batch(kept[block.indptr], genes[keep], block.data[keep], n_genes)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of positions ``0..n-1`` whose order is a pure function of ``(seed, epoch)``.

    Because nothing but ``(seed, epoch)`` decides an epoch's order, an interrupted run resumes mid-epoch by skipping
    the batches it already trained on (:meth:`resume`), and distributed ranks agree on one permutation and take
    disjoint shards of it without communicating.

    Parameters
    ----------
    n
        Number of rows.
    batch_size
        Rows per batch.
    shuffle
        Permute the rows every epoch; else keep their order.
    seed
        Seed of the permutations.
    drop_single
        Drop a last batch of a single row (BatchNorm cannot train on it).
    num_replicas, rank
        Shard for distributed training; default: from :mod:`torch.distributed` when it is initialised (when
        iterating, since Lightning starts the process group after the loader is built), else one replica.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_single: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.n, self.batch_size, self.shuffle, self.seed = int(n), int(batch_size), shuffle, int(seed)
        self.drop_single, self.num_replicas, self.rank = drop_single, num_replicas, rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is drawn next (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def resume(self, epoch: int, n_done: int) -> None:
        """Make the next iteration continue ``epoch`` after its first ``n_done`` batches."""
        self.epoch, self._skip = int(epoch), int(n_done)

    def _world(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return self.num_replicas, self.rank or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def positions(self, epoch: int | None = None) -> np.ndarray:
        """Positions of this rank in ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        world, rank = self._world()
        if world > 1:
            # Equal shards (DDP steps in lockstep): up to world − 1 rows sit out an epoch, different ones each epoch.
            order = order[: self.n // world * world][rank::world]
        return order

    def _batches(self) -> list[np.ndarray]:
        order = self.positions()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_single and len(batches) > 1 and len(batches[-1]) == 1:
            batches.pop()
        return batches

    def __iter__(self):
        skip, self._skip = self._skip, 0
        for batch in self._batches()[skip:]:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._batches())


class EpochLoader(DataLoader):
    """A loader over an iterable dataset that starts each pass with ``dataset.next_epoch()`` (a new shuffle each).

    Lightning only calls ``set_epoch`` on samplers, which iterable datasets do not have; workers get a fresh copy of
    the dataset per pass (no persistent workers), so advancing it here in the main process reaches them.
    """

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, batch_size=None, shuffle=False, **kwargs)

    def __iter__(self):
        self.dataset.next_epoch()
        return super().__iter__()

    def __len__(self) -> int:
        return len(self.dataset)


def make_loader(
    X,
    rows: np.ndarray,
    batch_size: int,
    labels: np.ndarray | None = None,
    shuffle: bool = False,
    aligner: GeneAligner | None = None,
    seed: int | None = None,
    num_workers: int = 0,
    batches: np.ndarray | None = None,
    targets: np.ndarray | None = None,
    batch_format: str = "auto",
) -> DataLoader:
    """A loader yielding ``{"x": (B, n_genes) float32, "y": (B,) int64, "batch": (B,) int64}`` batches of rows.

    ``y``, ``batch`` and ``target`` (each cell's acceptable-label mask row) are present when ``labels``,
    ``batches`` and ``targets`` are given; all three are indexed by row of ``X``. The loader's ``sampler`` is an
    :class:`EpochBatchSampler`: with ``shuffle=True`` each epoch's order depends on ``(seed, epoch)`` only, and
    under :mod:`torch.distributed` each rank reads its own shard (loaders without shuffling are not sharded).

    Training loaders (``shuffle=True``) drop a last batch of a single cell, which BatchNorm cannot use.

    ``batch_format="sparse"`` yields the CSR parts of ``x`` instead (``x_indptr``, ``x_indices``, ``x_values``,
    ``x_shape``; see :mod:`schce.nn._batch`), densified by the model on its device; ``"auto"`` (default) does so
    for an in-memory scipy sparse ``X``, ``"dense"`` never.
    """
    ds = _RowBatches(X, rows, labels, aligner, batches, targets, batch_format)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    # Only training is sharded: every rank evaluates all validation cells, so its metrics agree across ranks.
    sampler = EpochBatchSampler(
        len(ds), batch_size, shuffle=shuffle, seed=seed, drop_single=shuffle, num_replicas=None if shuffle else 1
    )
    return DataLoader(
        ds,
        sampler=sampler,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Worker seeds come from this generator, not the global RNG, so building an iterator draws nothing from it.
        generator=torch.Generator().manual_seed(seed),
    )


def stratified_split(labels: np.ndarray, validation_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into train and validation, per label, so every label with ≥ 2 cells is in both.

    Returns
    -------
    ``(train, validation)`` sorted row indices.
    """
    if not 0 <= validation_size < 1:
        raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for code in np.unique(labels):
        idx = np.flatnonzero(labels == code)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * validation_size))
        if validation_size > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def group_split(
    groups: np.ndarray, validation_size: float, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split row indices by whole groups (donors, samples, batches), as scTab splits by donor.

    Groups are shuffled with ``seed``; validation groups are taken until they hold at least ``validation_size`` of
    the cells, then test groups until ``test_size``; the rest train. A non-zero size always gets at least one
    group, and training always keeps at least one.

    Returns
    -------
    ``(train, validation, test)`` sorted row indices.
    """
    for name, size in (("validation_size", validation_size), ("test_size", test_size)):
        if not 0 <= size < 1:
            raise ValueError(f"{name} must be in [0, 1), got {size}.")
    codes, uniques = pd.factorize(np.asarray(groups))
    if (codes < 0).any():
        raise ValueError("The split column has missing values; fill or drop them first.")
    needed = (validation_size > 0) + (test_size > 0) + 1
    if len(uniques) < needed:
        raise ValueError(
            f"Splitting by groups needs at least {needed} groups for train/validation/test, found {len(uniques)}."
        )
    order = np.random.default_rng(seed).permutation(len(uniques))
    sizes = np.bincount(codes, minlength=len(uniques))
    n = len(codes)
    chosen: list[list[int]] = [[], []]
    pos = 0
    for part, size in enumerate((validation_size, test_size)):
        while size > 0 and (not chosen[part] or sizes[chosen[part]].sum() < size * n):
            if len(uniques) - pos <= needed - 1 - part:  # keep a group for each later part and for training
                break
            chosen[part].append(order[pos])
            pos += 1
    val_groups, test_groups = (np.isin(codes, c) for c in chosen)
    train = ~(val_groups | test_groups)
    return np.flatnonzero(train), np.flatnonzero(val_groups), np.flatnonzero(test_groups)


def split_cells(
    labels: np.ndarray, validation_size: float, test_size: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test row indices: by whole ``groups`` when given, else stratified by label.

    ``validation_size`` and ``test_size`` are fractions of all cells.
    """
    if groups is not None:
        return group_split(groups, validation_size, test_size, seed)
    if not 0 <= test_size < 1 or not 0 <= validation_size < 1 or validation_size + test_size >= 1:
        raise ValueError(f"validation_size + test_size must be below 1, got {validation_size} + {test_size}.")
    # The validation draw uses `seed` itself, so adding a test set leaves no other draw changed by it.
    rest, test = (
        stratified_split(labels, test_size, seed + 1) if test_size else (np.arange(len(labels)), np.array([], int))
    )
    train, val = stratified_split(labels[rest], validation_size / (1 - test_size), seed)
    return rest[train], rest[val], test
