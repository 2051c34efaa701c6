"""scTab's training-data augmentation: batch-effect-like shifts learnt from differences between groups."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from schce.data._expression import get_matrix, read_rows
from schce.nn._module import normalize_counts

logger = logging.getLogger(__name__)

_CHUNK = 4096
CLAMP = (0.0, 9.0)  # range of log1p(1e4-normalised) values scTab clamps augmented inputs to


def augmentation_matrix(
    X,
    labels,
    groups,
    normalize: bool = True,
    max_per_label: int = 300,
    threshold: float = 0.25,
    clip: float = 1.5,
    min_cells: int = 1,
    seed: int = 0,
    layer: str | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Build an augmentation matrix from training data, the idea of scTab's ``augmentations.npy``.

    For every label, the mean normalised expression of its cells is taken per group (sample, donor or batch); each
    row of the result is the difference of two such means of one label, i.e. a shift that the group alone causes.
    Up to ``max_per_label`` pairs are drawn per label. Entries with ``|value| <= threshold`` are set to 0 and the rest
    clipped to ``[-clip, clip]``. Training adds a random row with a random sign to each normalised input and clamps
    to ``[0, 9]`` (``HCEClassifier.train(augment=True)``).

    Parameters
    ----------
    X
        Cells × genes: an AnnData (then ``labels`` and ``groups`` may be ``obs`` column names), a dense or sparse
        matrix.
    labels
        Cell type of every cell (array, or an ``obs`` column name).
    groups
        Sample / donor / batch of every cell (array, or an ``obs`` column name).
    normalize
        ``True`` when ``X`` holds counts (normalised with :func:`schce.nn.normalize_counts` first); ``False`` when it
        is log-normalised already.
    max_per_label
        Most rows per label (scTab: 300).
    threshold, clip
        Small entries are zeroed, large ones clipped (scTab: 0.25 and 1.5).
    min_cells
        Groups with fewer cells of a label are not used for that label.
    seed
        Seeds the choice of pairs.
    layer
        Layer of an AnnData ``X``.
    rows
        Use only these cells (e.g. the training cells); default: all.

    Returns
    -------
    ``(n_rows, n_genes)`` float32 matrix (``n_rows`` may be 0 when no label occurs in two groups).
    """
    from anndata import AnnData

    if isinstance(X, AnnData):
        adata = X
        labels = adata.obs[labels].to_numpy() if isinstance(labels, str) else labels
        groups = adata.obs[groups].to_numpy() if isinstance(groups, str) else groups
        X = get_matrix(adata, layer)
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_cells = X.shape[0]
    if len(labels) != n_cells or len(groups) != n_cells:
        raise ValueError(
            f"labels ({len(labels)}) and groups ({len(groups)}) need one entry per cell of X ({n_cells} cells)."
        )
    if max_per_label < 1 or threshold < 0 or clip <= 0:
        raise ValueError("max_per_label must be ≥ 1, threshold ≥ 0 and clip > 0.")
    if rows is not None:
        keep = np.zeros(n_cells, dtype=bool)
        keep[np.asarray(rows)] = True
        labels, groups = np.where(keep, labels, None), groups
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    for label in sorted(set(labels.tolist()) - {None}, key=str):
        in_label = labels == label
        means = []
        for group in sorted(set(groups[in_label].tolist()), key=str):
            idx = np.flatnonzero(in_label & (groups == group))
            if len(idx) < min_cells:
                continue
            total = np.zeros(X.shape[1])
            for start in range(0, len(idx), _CHUNK):  # in chunks, so large groups need little memory
                x = torch.from_numpy(read_rows(X, idx[start : start + _CHUNK]))
                total += (normalize_counts(x) if normalize else x).double().sum(0).numpy()
            means.append(total / len(idx))
        pairs = [(i, j) for i in range(len(means)) for j in range(i + 1, len(means))]
        if not pairs:
            continue
        chosen = rng.choice(len(pairs), size=min(len(pairs), max_per_label), replace=False)
        rows += [means[pairs[k][0]] - means[pairs[k][1]] for k in sorted(chosen)]
    if not rows:
        return np.zeros((0, X.shape[1]), dtype=np.float32)
    out = np.stack(rows)
    out[np.abs(out) <= threshold] = 0.0
    return np.clip(out, -clip, clip).astype(np.float32)


def augment(x: torch.Tensor, augmentations: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add a random row of ``augmentations`` with a random sign to every row of normalised ``x``, clamp to [0, 9]."""
    n = x.shape[0]
    rows = torch.randint(0, augmentations.shape[0], (n,), device=x.device, generator=generator)
    # A fair coin per cell, drawn as scTab draws it (Bernoulli), so a seeded run draws the published random numbers.
    sign = 2.0 * (torch.bernoulli(torch.full((n, 1), 0.5, device=x.device, dtype=x.dtype), generator=generator) - 0.5)
    return torch.clamp(x + sign * augmentations[rows], *CLAMP)


def _label_group_means(X, labels, groups, rows: np.ndarray, normalize: bool) -> dict:
    """``label -> (n_groups, n_genes)`` mean expression of each group's cells of that label, among ``rows``."""
    out = {}
    for label in sorted(set(labels[rows].tolist()), key=str):
        in_label = rows[labels[rows] == label]
        means = []
        for group in sorted(set(groups[in_label].tolist()), key=str):
            idx = np.sort(in_label[groups[in_label] == group])
            total = np.zeros(X.shape[1])
            for start in range(0, len(idx), _CHUNK):
                x = torch.from_numpy(read_rows(X, idx[start : start + _CHUNK]))
                total += (normalize_counts(x) if normalize else x).double().sum(0).numpy()
            means.append(total / len(idx))
        out[label] = np.stack(means)
    return out


def published_augmentation_candidates(
    X, labels, groups, n_cells: int = 500_000, max_per_label: int = 300, normalize: bool = False, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The rows scTab's augmentation notebook computes before its KMeans selection, and the label of each row.

    ``X`` is cells × genes (dense, sparse, or an AnnData whose ``obs`` column names may be given as ``labels`` /
    ``groups``).

    Steps, as theislab/scTab ``notebooks/data_augmentation/data_augmentation.ipynb`` takes them: draw ``n_cells``
    cells without replacement with probability inversely proportional to their label's frequency (all cells when
    there are fewer); per label, the mean of each group's (scTab: ``tech_sample``) cells; per label with ``n`` groups
    ``min(n (n - 1) / 2 - 1, max_per_label)`` distinct pairs ``(j < k)`` drawn at random, each giving the row
    ``mean_j - mean_k`` (so a label in 2 groups gives none: the published count is one less than the pairs); entries
    with ``|value| <= 0.25`` set to 0, the rest clipped to ``[-1.5, 1.5]``.
    """
    from anndata import AnnData

    if isinstance(X, AnnData):  # then labels and groups may be obs column names
        labels = X.obs[labels].to_numpy() if isinstance(labels, str) else labels
        groups = X.obs[groups].to_numpy() if isinstance(groups, str) else groups
        X = get_matrix(X, None)
    labels, groups = np.asarray(labels), np.asarray(groups)
    n = X.shape[0]
    if len(labels) != n or len(groups) != n:
        raise ValueError(f"labels ({len(labels)}) and groups ({len(groups)}) need one entry per cell of X ({n}).")
    if n_cells < 1 or max_per_label < 1:
        raise ValueError("n_cells and max_per_label must be ≥ 1.")
    rng = np.random.default_rng(seed)
    if n_cells < n:
        counts = pd.Series(labels).map(pd.Series(labels).value_counts()).to_numpy(dtype=np.float64)
        p = (1.0 / counts) / (1.0 / counts).sum()
        rows = np.sort(rng.choice(n, size=n_cells, replace=False, p=p))
    else:
        rows = np.arange(n)
    out, row_labels = [], []
    for label, means in _label_group_means(X, labels, groups, rows, normalize).items():
        k = len(means)
        n_rows = min(k * (k - 1) // 2 - 1, max_per_label)
        if n_rows <= 0:
            continue
        pairs = np.array([(i, j) for i in range(k) for j in range(i + 1, k)])
        chosen = pairs[rng.choice(len(pairs), size=n_rows, replace=False)]
        out.append(means[chosen[:, 0]] - means[chosen[:, 1]])
        row_labels += [label] * n_rows
    if not out:
        raise ValueError("No label has cells in more than two groups; scTab's construction yields no rows.")
    rows_out = np.concatenate(out)
    rows_out[np.abs(rows_out) <= 0.25] = 0.0
    return np.clip(rows_out, -1.5, 1.5).astype(np.float32), np.asarray(row_labels)


def published_augmentation_matrix(
    X,
    labels,
    groups,
    n_cells: int = 500_000,
    max_per_label: int = 300,
    n_clusters: int = 50,
    min_cluster_size: int = 2000,
    n_rows: int = 5000,
    normalize: bool = False,
    seed: int = 1,
) -> np.ndarray:
    """The matrix of scTab's ``augmentations.npy``, built the way its notebook builds it.

    The candidate rows of :func:`published_augmentation_candidates` are clustered with KMeans
    (``n_clusters``, scikit-learn's ``n_init="auto"``); rows of clusters with more than ``min_cluster_size`` rows are
    kept, and ``n_rows`` of them drawn uniformly without replacement. The published values: 500,000 cells,
    300 pairs per label, 50 clusters, clusters above 2,000 rows, 5,000 rows, on log1p-normalised data
    (``normalize=False``; ``True`` normalises counts first), grouped by ``tech_sample``. scTab seeds its draws with
    ``default_rng(1)`` but its pair choice and KMeans are unseeded, so the exact published matrix cannot be
    regenerated; here every draw follows ``seed``.

    Parameters
    ----------
    X, labels, groups, n_cells, max_per_label, normalize, seed
        As in :func:`published_augmentation_candidates`.
    n_clusters, min_cluster_size, n_rows
        KMeans clusters, the size a cluster must exceed to be used, and the rows drawn.

    Returns
    -------
    ``(n_rows, n_genes)`` float32 matrix, for ``HCEClassifier.train(augment=...)``.

    Raises
    ------
    ValueError
        If the kept clusters hold fewer than ``n_rows`` rows (the message gives the counts), or an input is bad.
    """
    from sklearn.cluster import KMeans

    if n_clusters < 1 or min_cluster_size < 0 or n_rows < 1:
        raise ValueError("n_clusters and n_rows must be ≥ 1 and min_cluster_size ≥ 0.")
    candidates, _ = published_augmentation_candidates(X, labels, groups, n_cells, max_per_label, normalize, seed)
    if len(candidates) < n_clusters:
        raise ValueError(f"{len(candidates)} candidate rows cannot form {n_clusters} clusters; lower n_clusters.")
    clusters = KMeans(n_clusters=n_clusters, n_init="auto", random_state=seed).fit(candidates).labels_
    sizes = np.bincount(clusters, minlength=n_clusters)
    usable = candidates[sizes[clusters] > min_cluster_size]
    if len(usable) < n_rows:
        raise ValueError(
            f"Clusters with more than {min_cluster_size} rows hold {len(usable)} of {len(candidates)} candidate rows, "
            f"fewer than n_rows={n_rows}; lower min_cluster_size or n_rows (scTab: 2000 and 5000 on 15M cells)."
        )
    pick = np.random.default_rng(seed).choice(len(usable), size=n_rows, replace=False)
    logger.info(
        "Augmentation matrix: %d of %d candidate rows in %d of %d clusters; drew %d.",
        len(usable),
        len(candidates),
        int((sizes > min_cluster_size).sum()),
        n_clusters,
        n_rows,
    )
    return usable[pick]
