"""Census queries: out-of-distribution datasets and a query AnnData over the model's genes."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from tqdm.auto import tqdm

from schce.data.census._soma import (
    LABEL_COLUMN,
    SCTAB_ASSAYS,
    HCEClassifier,
    _cell_type_terms,
    _child,
    _experiment,
    _GeneMap,
    _require_soma,
    _value_filter,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- datasets
def _datasets(census) -> pd.DataFrame:
    info = _child(census, "census_info", "The census")
    return _child(info, "datasets", "census_info").read().concat().to_pandas()


def ood_datasets(census, reference_census) -> pd.DataFrame:
    """Datasets of one census release that are absent from another: the HCE paper's out-of-distribution protocol.

    A model trained on ``reference_census`` (scTab: release ``2023-05-15``) never saw these datasets, so they
    measure transfer to new studies.

    Parameters
    ----------
    census
        The newer census, opened: ``cellxgene_census.open_soma(census_version="2023-12-15")``.
    reference_census
        The census the model was trained on, opened: ``cellxgene_census.open_soma(census_version="2023-05-15")``.

    Returns
    -------
    The rows of ``census``'s ``census_info/datasets`` whose ``dataset_id`` is not in ``reference_census``, in
    ``census`` order (columns as in the census: ``dataset_id``, ``dataset_title``, ``collection_name``,
    ``dataset_total_cell_count`` ...). Select their cells with
    ``obs_value_filter=f"dataset_id in {ood['dataset_id'].tolist()}"``.
    """
    _require_soma()
    new = _datasets(census)
    old = _datasets(reference_census)
    for name, frame in (("census", new), ("reference_census", old)):
        if "dataset_id" not in frame.columns:
            raise KeyError(f"{name}['census_info']['datasets'] has no 'dataset_id' column: {list(frame.columns)}.")
    out = new[~new["dataset_id"].isin(set(old["dataset_id"]))].reset_index(drop=True)
    logger.info("%d of %d datasets are absent from the reference census.", len(out), len(new))
    return out


def get_query_anndata(
    census,
    model: HCEClassifier,
    obs_value_filter: str | None = None,
    organism: str = "homo_sapiens",
    *,
    include_descendants: bool = True,
    primary_only: bool = True,
    assays: Sequence[str] | None = SCTAB_ASSAYS,
    obs_column_names: Sequence[str] | None = None,
    gene_column: str | None = None,
    measurement_name: str = "RNA",
    X_name: str = "raw",
    ontology=None,
    chunk_size: int = 50_000,
    progress: bool = True,
) -> AnnData:
    """Census cells the model can be scored on, as AnnData of raw counts over the model's genes.

    Applies scTab's filters (primary data only, the 10x assays :data:`SCTAB_ASSAYS`) and keeps cells whose
    ``cell_type_ontology_term_id`` is a model label **or a Cell Ontology descendant of one**: finer labels stay and
    are scored against their nearest model ancestor by :meth:`~schce.HCEClassifier.evaluate` (scTab drops them).

    Parameters
    ----------
    census
        An opened census, e.g. ``cellxgene_census.open_soma(census_version="2023-12-15")``, or
        ``tiledbsoma.open(path)`` for a local store in the census layout.
    model
        A :class:`~schce.HCEClassifier`; its labels select the cells and its genes the columns.
    obs_value_filter
        An extra SOMA value filter on ``obs``, combined with ``and``, e.g. ``"tissue_general == 'lung'"`` or
        ``f"dataset_id in {ids}"`` (from :func:`ood_datasets`).
    organism
        Experiment under ``census_data``: ``"homo_sapiens"`` or ``"mus_musculus"``.
    include_descendants
        Keep cells annotated with a descendant of a model label (``False``: model labels only).
    primary_only
        Keep ``is_primary_data == True`` cells only (each cell once across the census).
    assays
        Assays to keep; ``None`` keeps all.
    obs_column_names
        ``obs`` columns to return; default all.
    gene_column
        ``var`` column matched against the model's genes; default ``feature_id`` for a model on Ensembl IDs, else
        ``feature_name``.
    measurement_name, X_name
        Where the counts are: census ``RNA`` / ``raw``.
    ontology
        Ontology for the descendants; default the model's (the embedded CL release unless set up with a file).
    chunk_size
        Cells per read; bounds the memory of one read.
    progress
        Show a progress bar over the chunks.

    Returns
    -------
    AnnData with ``X`` the raw counts (CSR float32) over ``model.genes`` in model order (missing genes are
    zero columns, ``var["in_census"]`` marks the found ones), ``obs`` the census columns indexed by
    ``soma_joinid``, and ``uns["census_query"]`` recording the filter, organism and gene overlap.
    """
    tiledbsoma = _require_soma()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    exp = _experiment(census, organism, measurement_name, X_name)
    genes = _GeneMap(exp, measurement_name, model, gene_column)
    terms = _cell_type_terms(model, include_descendants, ontology)
    value_filter = _value_filter(terms, primary_only, assays, obs_value_filter)
    columns = None
    if obs_column_names is not None:
        columns = list(dict.fromkeys(["soma_joinid", *obs_column_names]))
    try:
        obs = exp.obs.read(value_filter=value_filter, column_names=columns).concat().to_pandas()
    except (tiledbsoma.SOMAError, ValueError, SyntaxError) as err:
        raise ValueError(f"The census obs query failed for value filter {value_filter!r}: {err}") from err
    if len(obs) == 0:
        raise ValueError(
            f"No census cells match: {value_filter[:500]}. Loosen obs_value_filter, assays or primary_only, or "
            "check that the model's labels occur in this census."
        )
    obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    joinids = obs["soma_joinid"].to_numpy().astype(np.int64)
    X = exp.ms[measurement_name].X[X_name]
    column_of = pd.Index(genes.joinids)
    blocks = []
    starts = range(0, len(joinids), chunk_size)
    for start in tqdm(starts, desc="Reading census", unit="chunk", disable=not progress or len(starts) < 2):
        ids = joinids[start : start + chunk_size]
        table = X.read(coords=(ids, genes.joinids)).tables().concat()
        rows = np.searchsorted(ids, table["soma_dim_0"].to_numpy())
        cols = genes.positions[column_of.get_indexer(table["soma_dim_1"].to_numpy())]
        data = table["soma_data"].to_numpy().astype(np.float32)
        blocks.append(sp.csr_matrix((data, (rows, cols)), shape=(len(ids), genes.n_model), dtype=np.float32))
    matrix = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    matrix.sum_duplicates()
    obs.index = pd.Index(obs["soma_joinid"].astype(str).to_numpy())
    if LABEL_COLUMN in obs.columns:
        finer = int((~obs[LABEL_COLUMN].astype(str).isin(set(model.hierarchy.labels))).sum())
        logger.info("%d census cells selected, %d of them with labels finer than the model's.", len(obs), finer)
    adata = AnnData(X=matrix, obs=obs, var=genes.var.copy())
    adata.uns["census_query"] = {
        "organism": organism,
        "value_filter": value_filter,
        "gene_column": genes.column,
        "gene_overlap": genes.aligner.summary(),
        "measurement_name": measurement_name,
        "X_name": X_name,
    }
    return adata
