"""Majority voting over clusters: one call per cluster, aware of the hierarchy (CellTypist's smoothing, subtree-aware).

A cluster whose cells the model splits between sibling labels (say naive and memory CD4 T) gets their closest common
ancestor that a majority of the cluster supports, rather than the larger sibling; the fraction of the cluster that
agrees with the vote is written beside it.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import numpy as np
import pandas as pd
from anndata import AnnData

from schce._keys import check_foreign_keys, check_key_added, record_written, voting_keys, written_before
from schce._output import present_categorical
from schce.hierarchy import Hierarchy

logger = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
# CellTypist's over-clustering resolutions by number of cells: fine clusters, so that voting only smooths noise.
_RESOLUTIONS = ((5_000, 5.0), (20_000, 10.0), (40_000, 15.0), (100_000, 20.0), (200_000, 25.0))


def default_resolution(n_cells: int) -> float:
    """Leiden resolution of the automatic over-clustering for ``n_cells`` cells (as CellTypist chooses it)."""
    return next((res for limit, res in _RESOLUTIONS if n_cells < limit), 30.0)


def vote(
    predictions: np.ndarray, clusters: np.ndarray, hierarchy: Hierarchy, min_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """The subtree-aware majority term of every cluster.

    For each cluster and each term ``t`` of ``hierarchy`` (labels and their ancestors), the support of ``t`` is the
    fraction of the cluster's cells whose predicted label is ``t`` or a descendant of ``t``. The vote is the deepest
    term with support above ``min_fraction`` (ties: the higher support). Cells whose prediction is not a model
    label (``"unassigned"``) support no term; a cluster where no term has a majority is ``"unassigned"``.

    Parameters
    ----------
    predictions
        Per cell, a label ID of ``hierarchy`` or anything else for an unassigned cell.
    clusters
        Per cell, its cluster.
    hierarchy
        The model's hierarchy.
    min_fraction
        Support a term needs (strictly more than this), in ``[0.5, 1)`` so that at most one branch can win.

    Returns
    -------
    ``(term ID, support)`` per cell: the vote of its cluster and the fraction of the cluster inside the voted
    term's subtree (for ``"unassigned"``: the fraction of unassigned cells).
    """
    if not 0.5 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0.5, 1) so that at most one branch wins, got {min_fraction}.")
    predictions = np.asarray(predictions).astype(str)
    clusters = pd.Categorical(np.asarray(clusters).astype(str))
    index = {label: i for i, label in enumerate(hierarchy.labels)}
    label_codes = np.array([index.get(p, -1) for p in predictions])
    assigned = label_codes >= 0
    # counts[c, l]: cells of cluster c predicted as label l; support = counts @ term_matrix.T / cluster size.
    counts = np.zeros((len(clusters.categories), hierarchy.n_labels))
    np.add.at(counts, (clusters.codes[assigned], label_codes[assigned]), 1)
    sizes = np.bincount(clusters.codes, minlength=len(clusters.categories)).astype(float)
    support = counts @ hierarchy.term_matrix.T.astype(float) / sizes[:, None]
    # Depth first, then support (support ≤ 1, so depth + support / 2 orders by depth and breaks ties by support).
    key = np.where(support > min_fraction, hierarchy.depth[None, :] + support * 0.5, -np.inf)
    best = key.argmax(axis=1)
    has_majority = np.isfinite(key.max(axis=1))
    terms = np.asarray(hierarchy.terms, dtype=object)
    cluster_term = np.where(has_majority, terms[best], UNASSIGNED)
    unassigned_share = 1 - counts.sum(axis=1) / sizes
    cluster_support = np.where(has_majority, support[np.arange(len(best)), best], unassigned_share)
    return cluster_term[clusters.codes], cluster_support[clusters.codes].astype(np.float32)


@contextlib.contextmanager
def _torch_threads_kept():
    """Put torch's thread count back after the block (when torch is loaded; this module does not import it).

    ``sc.pp.neighbors`` runs numba's parallel loops, whose OpenMP start-up resets the thread count of the OpenMP
    runtime torch shares: torch went from 1 thread to all cores, so a training after ``majority_voting=True`` in the
    same session ran with other threads and gave other numbers than the same training before it.
    """
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def over_cluster(embedding: np.ndarray, resolution: float | None = None, random_state: int = 0) -> np.ndarray:
    """Leiden clusters of a neighbour graph of ``embedding`` (e.g. ``obsm["X_schce"]``), fine by default.

    The graph is built on a private AnnData, so nothing in the user's ``obsp`` / ``uns`` changes.
    """
    import scanpy as sc

    n = embedding.shape[0]
    resolution = default_resolution(n) if resolution is None else float(resolution)
    tmp = AnnData(obs=pd.DataFrame(index=[str(i) for i in range(n)]))
    tmp.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
    with _torch_threads_kept():
        sc.pp.neighbors(tmp, n_neighbors=min(10, max(n - 1, 2)), use_rep="X_emb", random_state=random_state)
    sc.tl.leiden(tmp, resolution=resolution, random_state=random_state, flavor="igraph", n_iterations=2)
    logger.info(
        "Over-clustered %d cells into %d clusters (leiden, resolution %g).", n, tmp.obs["leiden"].nunique(), resolution
    )
    return tmp.obs["leiden"].to_numpy()


def majority_vote(
    adata: AnnData,
    hierarchy: Hierarchy,
    *,
    key_added: str = "schce",
    over_clustering: str | None = None,
    resolution: float | None = None,
    min_fraction: float = 0.5,
    random_state: int = 0,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Smooth schce's predictions over clusters, writing the vote beside them.

    Reads ``obs["{key_added}_prediction_ontology_term_id"]`` (written by :meth:`~schce.HCEClassifier.predict`) and
    writes ``obs["{key_added}_majority_voting"]`` (CL name), ``obs["{key_added}_majority_voting_ontology_term_id"]``
    and ``obs["{key_added}_majority_voting_fraction"]`` (the share of the cluster inside the voted term's subtree);
    with automatic over-clustering also ``obs["{key_added}_over_clustering"]``. See :func:`vote` for the rule.

    Parameters
    ----------
    adata
        Cells predicted by the model.
    hierarchy
        The model's hierarchy (``model.hierarchy``).
    key_added
        Prefix of the prediction keys to read and of the keys written.
    over_clustering
        ``obs`` column with the clusters to vote in (e.g. ``"leiden"``); default: Leiden clusters of
        ``obsm["X_{key_added}"]`` at a fine resolution (see ``resolution``).
    resolution
        Resolution of the automatic over-clustering; default by number of cells: 5 below 5,000 cells, then 10, 15,
        20, 25 and 30 from 200,000 (as CellTypist).
    min_fraction
        Support the voted term needs, strictly more than this (see :func:`vote`).
    random_state
        Seed of the neighbour graph and of Leiden.
    overwrite
        Replace ``obs`` columns of the output names that schce did not write (refused by default, before any work,
        as in :meth:`~schce.HCEClassifier.predict`). A vote written earlier by schce is replaced (logged), and its
        automatic over-clustering removed when this vote uses ``over_clustering``; the columns written are recorded
        in ``uns["{key_added}"]["written"]``.

    Returns
    -------
    The written columns as a DataFrame indexed by ``obs_names``.
    """
    check_key_added(key_added)
    pred_key = f"{key_added}_prediction_ontology_term_id"
    if pred_key not in adata.obs:
        raise KeyError(f"adata.obs has no {pred_key!r}: run model.predict(adata, key_added={key_added!r}) first.")
    planned = voting_keys(key_added, over_clustering)
    replaced = check_foreign_keys(adata, key_added, {"obs": planned}, overwrite)  # before any work
    clusters, embedding = None, None
    if over_clustering is None:
        emb_key = f"X_{key_added}"
        if emb_key not in adata.obsm:
            raise KeyError(f"adata.obsm has no {emb_key!r} to over-cluster; pass over_clustering='<obs column>'.")
        embedding = np.asarray(adata.obsm[emb_key])
    else:
        clusters = cluster_column(adata.obs, over_clustering)
    out = voting_frame(
        adata.obs[pred_key].to_numpy(), adata.obs_names, hierarchy, key_added, clusters, embedding, resolution,
        min_fraction, random_state,
    )  # fmt: skip
    if replaced:
        logger.info("Overwriting earlier schce outputs: %s.", ", ".join(replaced))
    ours = written_before(adata, key_added)  # the earlier vote's automatic clusters, unless voted over now
    stale = [c for c in voting_keys(key_added) if ("obs", c) in ours and c not in out.columns and c != over_clustering]
    stale = [c for c in stale if c in adata.obs.columns]
    for column in stale:
        del adata.obs[column]
    for column in out.columns:
        adata.obs[column] = out[column].values
    record_written(adata, key_added, list(out.columns), dropped=stale)
    return out


def cluster_column(obs: pd.DataFrame, over_clustering: str) -> np.ndarray:
    """The clusters of ``obs[over_clustering]``, checked."""
    if over_clustering not in obs:
        raise KeyError(f"adata.obs has no column {over_clustering!r} to vote over.")
    if obs[over_clustering].isna().any():
        raise ValueError(f"adata.obs[{over_clustering!r}] has missing values; every cell needs a cluster.")
    return obs[over_clustering].to_numpy()


def voting_frame(
    predictions: np.ndarray,
    obs_names: pd.Index,
    hierarchy: Hierarchy,
    key_added: str = "schce",
    clusters: np.ndarray | None = None,
    embedding: np.ndarray | None = None,
    resolution: float | None = None,
    min_fraction: float = 0.5,
    random_state: int = 0,
) -> pd.DataFrame:
    """The majority-voting columns of :func:`majority_vote` for predicted label IDs, without writing anything.

    ``clusters`` per cell, or ``embedding`` to over-cluster (then ``{key_added}_over_clustering`` is included).
    """
    written = {}
    if clusters is None:
        clusters = over_cluster(embedding, resolution, random_state)
        written[f"{key_added}_over_clustering"] = pd.Categorical(clusters, categories=sorted(set(clusters), key=int))
    terms, support = vote(predictions, clusters, hierarchy, min_fraction)
    names = np.array([UNASSIGNED if t == UNASSIGNED else hierarchy.name(t) for t in terms], dtype=object)
    written[f"{key_added}_majority_voting"] = present_categorical(names, hierarchy, names=True)
    written[f"{key_added}_majority_voting_ontology_term_id"] = present_categorical(terms, hierarchy)
    written[f"{key_added}_majority_voting_fraction"] = support
    changed = float(np.mean(terms != np.asarray(predictions).astype(str)))
    logger.info("Majority voting changed %.1f%% of the calls (%d clusters).", 100 * changed, len(set(clusters)))
    return pd.DataFrame(written, index=obs_names)
