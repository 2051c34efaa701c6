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
    read_compact_rows,
    read_lookup,
    read_var,
    split_parts,
    store_layout,
)


class _Block:
    """One row group in memory: expression as a dense array or as CSR parts, and its other columns."""

    def __init__(self, table, n_genes: int, dense=None, offsets=None, indices=None, values=None):
        self.table, self.n_genes = table, n_genes
        self.dense, self.offsets, self.indices, self.values = dense, offsets, indices, values

    def __len__(self) -> int:
        return self.table.num_rows

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

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
        pos, lens = self._csr_positions(rows)
        offsets = np.zeros(len(rows) + 1, dtype=self.offsets.dtype)
        np.cumsum(lens, out=offsets[1:])
        return _Block(table, self.n_genes, offsets=offsets, indices=self.indices[pos], values=self.values[pos])

    def to_csr(self, n: int):
        import scipy.sparse as sp

        if self.dense is not None:
            return sp.csr_matrix(self.dense[:n])
        pos, lens = self._csr_positions(np.arange(n))
        indptr = np.concatenate([[0], np.cumsum(lens)])
        out = sp.csr_matrix(
            (self.values[pos].astype(np.float32), self.indices[pos].astype(np.int32), indptr), shape=(n, self.n_genes)
        )
        out.sort_indices()  # compact parts hold each cell's genes in the part's gene order
        return out


def _read_block(pf: pq.ParquetFile, group: int, layout: str, n_genes: int, columns: list[str] | None) -> _Block:
    """Row group ``group`` of a part; ``columns`` are the non-expression columns to keep (``None``: all)."""
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
    offsets, indices, values = read_compact_rows(pf, table)
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
