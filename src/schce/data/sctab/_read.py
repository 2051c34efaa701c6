"""Reading scTab stores: row groups as blocks (dense or CSR) and a split as an AnnData."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from anndata import AnnData

from schce.data.sctab import _kernels
from schce.data.sctab._format import (
    CODE_COLUMNS,
    _dense_values,
    coded_cells,
    part_codec,
    read_compact_rows,
    read_lookup,
    read_var,
    split_parts,
    store_layout,
)


class _Block:
    """One row group in memory, and its other columns.

    Expression as a dense array (``dense``), as decoded CSR parts (``offsets``, ``indices``, ``values``) or, for
    the compact format 2 with numba, as stored (``coded``, a :class:`~schce.data.sctab._kernels.CodedCells`):
    then the rows are decoded only into the batches that draw them.
    """

    def __init__(self, table, n_genes: int, dense=None, offsets=None, indices=None, values=None, coded=None):
        self.table, self.n_genes = table, n_genes
        self.dense, self.offsets, self.indices, self.values = dense, offsets, indices, values
        self.coded = coded
        self._columns: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        """A non-expression column as numpy (converted once)."""
        if name not in self._columns:
            self._columns[name] = self.table.column(name).to_numpy()
        return self._columns[name]

    def _csr_positions(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts, ends = self.offsets[rows], self.offsets[rows + 1]
        lens = ends - starts
        total = int(lens.sum())
        # Positions of each row's entries in indices/values, all rows at once.
        pos = np.arange(total) + np.repeat(starts - (np.cumsum(lens) - lens), lens)
        return pos, lens

    def write_rows(self, rows: np.ndarray, out: np.ndarray, dest: np.ndarray) -> None:
        """``out[dest] = X[rows]``; ``out`` rows at ``dest`` must be zero for the compact layout."""
        if self.dense is not None:
            out[dest] = self.dense[rows]
            return
        if self.coded is not None:  # decoded into a small CSR first: the dense batch's zeroing costs far more
            offsets, indices, values = self.coded.decode(rows)
            _kernels.scatter_rows(offsets, indices, values, np.arange(len(rows)), dest, out)
            return
        if _kernels.AVAILABLE:  # one pass over the rows' entries, no position arrays
            _kernels.scatter_rows(self.offsets, self.indices, self.values, rows, dest, out)
            return
        pos, lens = self._csr_positions(rows)
        flat = np.repeat(dest.astype(np.int64) * self.n_genes, lens) + self.indices[pos]
        out.reshape(-1)[flat] = self.values[pos]

    def row_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Stored values per row (non-zeros for the dense layout)."""
        if self.dense is not None:
            return np.count_nonzero(self.dense[rows], axis=1)
        if self.coded is not None:
            return self.coded.lengths[rows]
        return self.offsets[rows + 1] - self.offsets[rows]

    def write_csr(self, rows: np.ndarray, indptr: np.ndarray, dest: np.ndarray, indices, values) -> None:
        """Place the entries of ``rows`` as rows ``dest`` of a CSR batch with ``indptr`` (from :meth:`row_lengths`)."""
        if self.dense is not None:
            sub = self.dense[rows]
            r, c = np.nonzero(sub)  # row-major: each row's entries together, in gene order
            lens = np.bincount(r, minlength=len(rows))
            out = np.arange(len(r)) + np.repeat(indptr[dest] - (np.cumsum(lens) - lens), lens)
            indices[out], values[out] = c, sub[r, c]
            return
        if self.coded is not None:
            self.coded.write_csr(rows, dest, indptr, indices, values)
            return
        if _kernels.AVAILABLE:
            _kernels.gather_rows(self.offsets, self.indices, self.values, rows, dest, indptr, indices, values)
            return
        pos, lens = self._csr_positions(rows)
        out = np.arange(len(pos)) + np.repeat(indptr[dest] - (np.cumsum(lens) - lens), lens)
        indices[out], values[out] = self.indices[pos], self.values[pos]

    def take(self, rows: np.ndarray) -> _Block:
        """A new block of only ``rows`` (in that order), copied, so that it holds no reference to this one's memory."""
        table = self.table.take(rows)
        if self.dense is not None:
            return _Block(table, self.n_genes, dense=self.dense[rows])
        if self.coded is not None:
            offsets, indices, values = self.coded.decode(rows)
            return _Block(table, self.n_genes, offsets=offsets, indices=indices, values=values)
        pos, lens = self._csr_positions(rows)
        offsets = np.zeros(len(rows) + 1, dtype=self.offsets.dtype)
        np.cumsum(lens, out=offsets[1:])
        return _Block(table, self.n_genes, offsets=offsets, indices=self.indices[pos], values=self.values[pos])

    def to_csr(self, n: int):
        import scipy.sparse as sp

        if self.dense is not None:
            return sp.csr_matrix(self.dense[:n])
        part = self.take(np.arange(n))  # the first n cells as decoded CSR parts
        out = sp.csr_matrix(
            (part.values.astype(np.float32, copy=False), part.indices.astype(np.int32, copy=False), part.offsets),
            shape=(n, self.n_genes),
        )
        out.sort_indices()  # compact parts hold each cell's genes in the part's gene order
        return out


def _read_block(
    pf: pq.ParquetFile, group: int, layout: str, n_genes: int, columns: list[str] | None, codec=False
) -> _Block:
    """Row group ``group`` of a part; ``columns`` are the non-expression columns to keep (``None``: all).

    ``codec``: the part's :func:`~schce.data.sctab._format.part_codec` when the caller has read it already (a
    reader of many row groups of one part reads it once).
    """
    names = [f.name for f in pf.schema_arrow]
    expr = ["X"] if layout == "dense" else ["indices", "values"]
    missing = [c for c in expr if c not in names]
    if missing:
        raise ValueError(f"A part of this {layout} store has no {missing} column (columns: {names}).")
    keep = [c for c in names if c not in expr] if columns is None else list(columns)
    table = pf.read_row_group(group, columns=expr + keep)
    rest = table.select(keep)
    if layout == "dense":
        return _Block(rest, n_genes, dense=_dense_values(table, n_genes))
    codec = part_codec(pf) if codec is False else codec
    if codec is not None and _kernels.AVAILABLE:
        coded = coded_cells(table.column("indices"), table.column("values"), codec[1], codec[0])
        return _Block(rest, n_genes, coded=coded)
    offsets, indices, values = read_compact_rows(table, codec)
    return _Block(rest, n_genes, offsets=offsets, indices=indices, values=values)


# ---------------------------------------------------------------------------------------------- reading as AnnData
def read_sctab_store(
    path: str | os.PathLike, split: str = "test", max_cells: int | None = None, decode: bool = True
) -> AnnData:
    """Read one split of a store (either layout) as an AnnData with a CSR ``X``, row group by row group.

    For prediction and evaluation on a store's test split with :meth:`~schce.HCEClassifier.predict` /
    :meth:`~schce.HCEClassifier.evaluate`; memory is that of the sparse matrix (use ``max_cells`` on a large split,
    or ``model.evaluate(datamodule=...)``, which streams).

    Parameters
    ----------
    path
        Store directory.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    max_cells
        Read only the first cells.
    decode
        Replace code columns by their labels (categoricals) from ``categorical_lookup``.

    Returns
    -------
    AnnData: ``X`` float32 CSR, ``obs`` with the code columns (``idx`` as index), ``var`` from ``var.parquet``
    indexed by ``feature_id``.
    """
    import scipy.sparse as sp

    layout = store_layout(path)
    var = read_var(path)
    n_genes = len(var)
    blocks, obs_parts, n = [], [], 0
    for part in split_parts(path, split):
        pf = pq.ParquetFile(part)
        for g in range(pf.num_row_groups):
            if max_cells is not None and n >= max_cells:
                break
            block = _read_block(pf, g, layout, n_genes, columns=None)
            keep = len(block) if max_cells is None else min(len(block), max_cells - n)
            blocks.append(block.to_csr(keep))
            obs_parts.append(block.table.slice(0, keep).to_pandas())
            n += keep
    X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)
    obs = pd.concat(obs_parts, ignore_index=True) if obs_parts else pd.DataFrame()
    if decode:
        for c in CODE_COLUMNS:
            lookup = Path(path) / "categorical_lookup" / f"{c}.parquet"
            if c in obs.columns and lookup.exists():
                obs[c] = pd.Categorical.from_codes(obs[c].to_numpy(), categories=read_lookup(path, c))
    if "idx" in obs.columns:
        obs.index = obs["idx"].astype(str).to_numpy()
    var_index = var["feature_id"] if "feature_id" in var.columns else var["feature_name"]
    var = var.set_index(pd.Index(var_index.astype(str).to_numpy()))
    return AnnData(X=X, obs=obs, var=var)
