"""Writing scTab stores: from AnnData (either layout) and converting the published dense store to the compact one."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from anndata import AnnData
from tqdm.auto import tqdm

from schce import _io
from schce.data._expression import get_matrix, read_rows
from schce.data._loader import split_cells
from schce.data._protocol import balanced_class_weights
from schce.data.sctab._format import (
    _GENE_ORDER_KEY,
    _PART_META_KEY,
    CODE_COLUMNS,
    COMPACT_FORMAT,
    COMPACT_META,
    COMPACT_VERSION,
    INDEX_CODING,
    INT_COLUMNS,
    ROW_GROUP_SIZE,
    SPLITS,
    _dense_values,
    _value_coding,
    cl_label_ids,
    encode_cells,
    read_var,
    split_parts,
    store_layout,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- writing
def _split_assignment(adata: AnnData, split_key, labels, validation_size, test_size, seed) -> np.ndarray:
    """``train``/``val``/``test`` per cell: from ``obs[split_key]`` when it holds those names, else by groups."""
    codes = pd.factorize(labels)[0]
    if split_key is not None:
        values = adata.obs[split_key].astype(str).to_numpy()
        names = set(np.unique(values))
        if names <= {"train", "val", "validation", "test"}:
            out = np.where(values == "validation", "val", values)
            if "train" not in names:
                raise ValueError(f"obs[{split_key!r}] names no cell 'train'; a store needs training cells.")
            return out
        tr, va, te = split_cells(codes, validation_size, test_size, seed, groups=values)
    else:
        tr, va, te = split_cells(codes, validation_size, test_size, seed)
    out = np.empty(adata.n_obs, dtype=object)
    out[tr], out[va], out[te] = "train", "val", "test"
    return out.astype(str)


def _dense_part_schema() -> pa.Schema:
    fields = [pa.field("X", pa.list_(pa.float32()))]
    fields += [pa.field(c, pa.int64()) for c in (*CODE_COLUMNS, *INT_COLUMNS)]
    fields.append(pa.field("is_primary_data", pa.bool_()))
    return pa.schema(fields)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def write_sctab_store(  # long: every check before any write, then the writer that streams the parts
    adata: AnnData,
    path: str | os.PathLike,
    split_key: str | None = None,
    labels_key: str = "cell_type",
    layer: str | None = None,
    validation_size: float = 0.1,
    test_size: float = 0.1,
    seed: int = 0,
    rows_per_part: int = 32 * ROW_GROUP_SIZE,
    n_augmentations: int = 16,
    ontology=None,
    overwrite: bool = False,
) -> Path:
    """Write an AnnData in the published scTab store layout (the layout of scTab's 164 GB training store).

    Cells are written in row groups of 1024 (dense ``X: list<float32>`` vectors over all genes), one chunk at a time:
    the whole matrix is never densified. The store appears at ``path`` only once complete.

    Parameters
    ----------
    adata
        Cells × genes with census-style ``obs`` columns (``dataset_id``, ``donor_id``, ``assay``, ``tissue``,
        ``tissue_general``, ``disease``, ``development_stage``; missing ones are written as ``"unknown"``;
        ``tech_sample`` defaults to dataset + donor). Not modified.
    path
        Store directory.
    split_key
        ``obs`` column: either ``"train"``/``"val"``/``"test"`` per cell, or groups (donors) split whole into
        train / validation / test (as scTab splits by donor). Default: random, stratified by label.
    labels_key
        ``obs`` column with the cell types (CL names or IDs); written as the ``cell_type`` codes and lookup.
    layer
        Layer with the expression; default ``adata.X``. Values are written as they are (scTab's store holds
        normalised ``log1p`` values; raw counts work too and are normalised by the model).
    validation_size, test_size, seed
        Fractions and seed of the split when ``split_key`` does not name the splits.
    rows_per_part
        Cells per ``part.N.parquet``.
    n_augmentations
        Rows of ``augmentations.npy``.
    ontology
        Ontology for ``child_matrix.npy``; default: the embedded CL release.
    overwrite
        Replace an existing store.

    Returns
    -------
    The store path.
    """
    from schce.hierarchy import Hierarchy
    from schce.ontology import load_cell_ontology

    # Everything is checked before anything is written.
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists. Pass overwrite=True to replace it, or choose another path.")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"adata is empty ({adata.n_obs} cells × {adata.n_vars} genes); nothing to write.")
    for key, what in ((labels_key, "labels_key"), (split_key, "split_key")):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(
                f"{what}={key!r} is not a column of adata.obs. Available columns: {list(adata.obs.columns)}."
            )
    if rows_per_part < ROW_GROUP_SIZE or rows_per_part % ROW_GROUP_SIZE:
        raise ValueError(f"rows_per_part must be a positive multiple of {ROW_GROUP_SIZE}, got {rows_per_part}.")
    X = get_matrix(adata, layer)
    labels = adata.obs[labels_key]
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} cell(s) have no label in obs[{labels_key!r}]; drop them first.")
    labels = labels.astype(str).to_numpy()
    onto = load_cell_ontology(ontology)
    label_names = sorted(set(labels))
    label_ids = cl_label_ids(
        label_names, onto, f"values of obs[{labels_key!r}]", "harmonise them before writing a store."
    )
    assignment = _split_assignment(adata, split_key, labels, validation_size, test_size, seed)

    lookups, codes, primary = _code_columns(adata.obs, labels, label_names)

    n_labels = len(label_names)
    train_rows = np.flatnonzero(assignment == "train")
    weights = balanced_class_weights(np.bincount(codes["cell_type"][train_rows], minlength=n_labels))
    child_matrix = Hierarchy.from_ontology(label_ids, onto).R.astype(np.float32)
    rng = np.random.default_rng(seed)
    augment = np.where(
        rng.random((n_augmentations, adata.n_vars)) < 0.05, rng.normal(0, 0.5, (n_augmentations, adata.n_vars)), 0
    ).astype(np.float32)
    var = _var_frame(adata)
    schema = _dense_part_schema()
    n_genes = adata.n_vars

    def write(tmp: Path) -> None:
        _write_common(tmp, var, lookups, child_matrix, weights, augment)
        bar = tqdm(total=adata.n_obs, desc="Writing store", unit="cell", disable=adata.n_obs < 50_000)
        for split in SPLITS:
            rows = np.flatnonzero(assignment == split)
            (tmp / split).mkdir()
            for part, start in enumerate(range(0, max(len(rows), 1), rows_per_part)):
                part_rows = rows[start : start + rows_per_part]
                with pq.ParquetWriter(tmp / split / f"part.{part}.parquet", schema, compression="snappy") as writer:
                    for g in range(0, len(part_rows), ROW_GROUP_SIZE):
                        r = part_rows[g : g + ROW_GROUP_SIZE]
                        dense = read_rows(X, r).ravel()
                        arrays = [_list_array(np.arange(len(r) + 1) * n_genes, dense)]
                        arrays += [pa.array(codes[c][r]) for c in (*CODE_COLUMNS, *INT_COLUMNS)]
                        arrays.append(pa.array(primary[r]))
                        writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=ROW_GROUP_SIZE)
                        bar.update(len(r))
                    if len(part_rows) == 0:
                        writer.write_table(schema.empty_table())
        bar.close()

    _io.write_dir_atomically(path, overwrite, write)
    logger.info(
        "Wrote a scTab store of %d cells (%s) to %s.",
        adata.n_obs,
        ", ".join(f"{s}: {(assignment == s).sum()}" for s in SPLITS),
        path,
    )
    return path


def _code_columns(obs: pd.DataFrame, labels: np.ndarray, label_names: list[str]):
    """The store's code columns: their lookups (sorted labels), int64 codes per cell, and ``is_primary_data``."""
    n_obs = len(obs)
    columns: dict[str, np.ndarray] = {"cell_type": labels}
    absent = [c for c in CODE_COLUMNS[1:] if c not in obs.columns and c != "tech_sample"]
    if absent:
        logger.warning("obs has no %s; written as 'unknown'.", absent)
    for c in CODE_COLUMNS[1:]:
        if c in obs.columns:
            columns[c] = obs[c].astype(str).to_numpy()
        elif c == "tech_sample":
            columns[c] = (pd.Series(columns["dataset_id"]) + "_" + pd.Series(columns["donor_id"])).to_numpy()
        else:
            columns[c] = np.full(n_obs, "unknown", dtype=object)
    lookups = {c: sorted(set(v)) if c != "cell_type" else label_names for c, v in columns.items()}
    codes = {c: pd.Categorical(columns[c], categories=lookups[c]).codes.astype(np.int64) for c in columns}
    codes["soma_joinid"] = (
        obs["soma_joinid"].to_numpy(np.int64) if "soma_joinid" in obs.columns else np.arange(n_obs, dtype=np.int64)
    )
    codes["idx"] = np.arange(n_obs, dtype=np.int64)
    primary = obs["is_primary_data"].to_numpy(bool) if "is_primary_data" in obs.columns else np.ones(n_obs, bool)

    return lookups, codes, primary


def _var_frame(adata: AnnData) -> pd.DataFrame:
    """``var.parquet``: Ensembl IDs and symbols from ``var`` columns of those names, else the var names."""
    names = adata.var_names.astype(str).to_numpy()
    return pd.DataFrame(
        {
            c: adata.var[c].astype(str).to_numpy() if c in adata.var.columns else names
            for c in ("feature_id", "feature_name")
        }
    )


def _write_common(tmp: Path, var: pd.DataFrame, lookups: dict, child_matrix, weights, augment) -> None:
    var.to_parquet(tmp / "var.parquet", index=False)
    (tmp / "categorical_lookup").mkdir()
    for c, values in lookups.items():
        lookup = pd.DataFrame({"idx": np.arange(len(values), dtype=np.int64), "label": list(values)})
        lookup.to_parquet(tmp / "categorical_lookup" / f"{c}.parquet", index=False)
    (tmp / "cell_type_hierarchy").mkdir()
    np.save(tmp / "cell_type_hierarchy" / "child_matrix.npy", child_matrix)
    np.save(tmp / "class_weights.npy", np.asarray(weights, dtype=np.float32))
    np.save(tmp / "augmentations.npy", augment)


def convert_sctab_store(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    float_dtype: str = "float16",
    compression: str = "zstd",
    compression_level: int | None = None,
    overwrite: bool = False,
    n_jobs: int = 1,
) -> Path:
    """Convert a dense scTab store into the compact CSR layout, part by part and row group by row group.

    Each part keeps its cells, order and 1024-row row groups; ``X`` becomes two binary columns, one byte string per
    cell. ``indices`` codes the cell's non-zero genes as gaps in the part's gene order (the genes sorted by how many
    cells express them, so the frequent genes give small gaps), as LEB128 varints. With integer counts (exact) a
    gap also carries one bit telling whether the count is above 1, and ``values`` holds only those counts, minus 2,
    as varints; other values are stored as ``float16`` (``float_dtype="float32"`` keeps full precision). Code
    columns are copied. Every part stores its own metadata (genes, value coding, cells, non-zeros, gene order) in
    its parquet key-value metadata; ``compact.json`` sums them up. ``var.parquet``, ``categorical_lookup/``,
    ``cell_type_hierarchy/`` and the ``.npy`` files are copied.

    Parameters
    ----------
    src
        A store in the published (dense) layout.
    dst
        Output directory.
    float_dtype
        ``"float16"`` or ``"float32"``, for non-integer values.
    compression
        Parquet codec for the parts.
    compression_level
        Codec level; default: the codec's default (zstd: 1). Higher zstd levels write much more slowly; levels 16
        and up shrink integer counts by about another 5%.
    overwrite
        Replace an existing ``dst``.
    n_jobs
        Parts converted at once, one process each (``-1``: one per CPU core). The parts written are byte-identical
        to a serial conversion. A progress bar counts the cells converted.
    """
    src, dst = Path(src), Path(dst)
    if not isinstance(n_jobs, int | np.integer) or n_jobs == 0 or n_jobs < -1:
        raise ValueError(f"n_jobs must be a positive number of processes or -1 (one per core), got {n_jobs!r}.")
    n_jobs = (os.cpu_count() or 1) if n_jobs == -1 else int(n_jobs)
    if store_layout(src) != "dense":
        raise ValueError(f"{src} is already a compact store.")
    if float_dtype not in ("float16", "float32"):
        raise ValueError(f"float_dtype must be 'float16' or 'float32', got {float_dtype!r}.")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists. Pass overwrite=True to replace it, or choose another path.")
    n_genes = len(read_var(src))
    summary = {
        "format": COMPACT_FORMAT,
        "format_version": COMPACT_VERSION,
        "n_genes": n_genes,
        "index_coding": INDEX_CODING,
        "splits": {},
    }
    options = {"compression": compression, "compression_level": compression_level}

    def write(tmp: Path) -> None:
        for name in ("var.parquet", "class_weights.npy", "augmentations.npy"):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        for name in ("categorical_lookup", "cell_type_hierarchy"):
            if (src / name).exists():
                shutil.copytree(src / name, tmp / name)
        jobs = []
        for split in SPLITS:
            (tmp / split).mkdir()
            jobs += [(split, part, tmp / split / part.name) for part in split_parts(src, split)]
        done = _convert_parts(jobs, n_genes, float_dtype, options, n_jobs)
        for split in SPLITS:
            counts = [done[k] for k, job in enumerate(jobs) if job[0] == split]
            summary["splits"][split] = {
                "n_cells": sum(n for n, _ in counts),
                "nnz": sum(nnz for _, nnz in counts),
                "parts": len(counts),
            }
        (tmp / COMPACT_META).write_text(json.dumps(summary, indent=1))

    _io.write_dir_atomically(dst, overwrite, write)
    logger.info("Converted %s to the compact layout at %s.", src, dst)
    return dst


def _convert_parts(jobs: list, n_genes: int, float_dtype: str, options: dict, n_jobs: int) -> list[tuple[int, int]]:
    """``(cells, non-zeros)`` of every ``(split, src, dst)`` part converted, in this process or ``n_jobs`` others."""
    total = sum(pq.ParquetFile(src).metadata.num_rows for _, src, _ in jobs)
    done: list[tuple[int, int]] = [(0, 0)] * len(jobs)
    with tqdm(total=total, desc="Converting", unit="cell", unit_scale=True, disable=total < 100_000) as bar:
        if n_jobs == 1 or len(jobs) < 2:
            for k, (_, src, dst) in enumerate(jobs):
                done[k] = _convert_part(src, dst, n_genes, float_dtype, options)
                bar.update(done[k][0])
            return done
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # Not forked from this process, which may hold arrow and torch thread pools mid-state: from a fork server
        # that imports this module once (spawning would import it again in every worker).
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        with ProcessPoolExecutor(min(n_jobs, len(jobs)), mp_context=context) as pool:
            futures = {
                pool.submit(_convert_part, src, dst, n_genes, float_dtype, options): k
                for k, (_, src, dst) in enumerate(jobs)
            }
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                bar.update(done[futures[future]][0])
    return done


def _convert_part(src: Path, dst: Path, n_genes: int, float_dtype: str, options: dict) -> tuple[int, int]:
    pf = pq.ParquetFile(src)
    other = [f for f in pf.schema_arrow if f.name != "X"]
    # Two passes over the part: the first decides the value coding and counts the cells expressing each gene.
    coding, expressed = "count", np.zeros(n_genes, dtype=np.int64)
    for g in range(pf.num_row_groups):
        x = _dense_values(pf.read_row_group(g, columns=["X"]), n_genes)
        expressed += np.count_nonzero(x, axis=0)
        if coding == "count":
            coding = _value_coding(x[x != 0], float_dtype)
    gene_order = np.argsort(-expressed, kind="stable")
    rank = np.empty(n_genes, dtype=np.int64)
    rank[gene_order] = np.arange(n_genes)
    schema = pa.schema([pa.field("indices", pa.binary()), pa.field("values", pa.binary()), *other])
    rest = [f.name for f in other]
    n_cells = nnz = 0
    # Dictionaries and statistics only for the code columns: the byte strings of cells have no use for them.
    writer = pq.ParquetWriter(dst, schema, use_dictionary=rest, write_statistics=rest, **options)
    try:
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            x = _dense_values(table.select(["X"]), n_genes)
            indices, values, n = encode_cells(x, rank, coding)
            arrays = [indices, values, *(table.column(name).combine_chunks() for name in rest)]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=ROW_GROUP_SIZE)
            n_cells += len(x)
            nnz += n
        order_dtype = "<u2" if n_genes <= 2**16 else "<u4"
        meta = {
            "format_version": COMPACT_VERSION,
            "n_genes": n_genes,
            "values": coding,
            "index_coding": INDEX_CODING,
            "gene_order": order_dtype,
            "n_cells": n_cells,
            "nnz": nnz,
            "source": src.name,
        }
        order_bytes = base64.b64encode(gene_order.astype(order_dtype).tobytes())
        writer.add_key_value_metadata({_PART_META_KEY: json.dumps(meta).encode(), _GENE_ORDER_KEY: order_bytes})
    finally:
        writer.close()
    return n_cells, nnz
