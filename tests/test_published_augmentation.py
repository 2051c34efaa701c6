"""scTab's augmentation matrix construction (inverse-frequency subsample, group-mean pairs, KMeans selection)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans

from schce.data import published_augmentation_matrix
from schce.data._augmentation import published_augmentation_candidates

GROUPS = {"A": 5, "B": 2, "C": 4}  # label -> number of groups holding it


def _data(seed: int = 0, cells_per_group: int = 6, n_genes: int = 8):
    rng = np.random.default_rng(seed)
    labels, groups, rows = [], [], []
    for label, k in GROUPS.items():
        for g in range(k):
            shift = rng.normal(0, 1.0, n_genes)  # a group effect big enough to pass the 0.25 threshold often
            rows.append(np.clip(2 + shift + rng.normal(0, 0.3, (cells_per_group, n_genes)), 0, None))
            labels += [label] * cells_per_group
            groups += [f"s{label}{g}"] * cells_per_group
    return np.concatenate(rows).astype(np.float32), np.array(labels), np.array(groups)


def _expected_rows(X, labels, groups, label):
    """Every thresholded, clipped difference mean_j - mean_k (j < k) of one label's group means."""
    df = pd.DataFrame(X[labels == label]).groupby(groups[labels == label]).mean().sort_index().to_numpy()
    out = {}
    for j in range(len(df)):
        for k in range(j + 1, len(df)):
            d = df[j] - df[k]
            d[np.abs(d) <= 0.25] = 0
            out[(j, k)] = np.clip(d, -1.5, 1.5)
    return out


def test_candidates_are_group_mean_differences_with_the_published_count():
    X, labels, groups = _data()
    rows, row_labels = published_augmentation_candidates(X, labels, groups, max_per_label=300)
    # n (n - 1) / 2 - 1 rows per label: 9 for A, 5 for C, none for B (2 groups).
    assert (row_labels == "A").sum() == 9 and (row_labels == "C").sum() == 5 and "B" not in row_labels
    for label in ("A", "C"):
        expected = _expected_rows(X, labels, groups, label)
        used = set()
        for row in rows[row_labels == label]:
            hits = [pair for pair, e in expected.items() if np.allclose(row, e, atol=1e-5)]
            assert len(hits) == 1
            used.add(hits[0])
        assert len(used) == (row_labels == label).sum()  # distinct pairs
    assert np.all((rows == 0) | (np.abs(rows) > 0.25)) and np.abs(rows).max() <= 1.5
    # max_per_label caps the rows per label.
    capped, capped_labels = published_augmentation_candidates(X, labels, groups, max_per_label=3)
    assert (capped_labels == "A").sum() == 3 and (capped_labels == "C").sum() == 3 and len(capped) == 6


def test_subsample_favours_rare_labels(monkeypatch):
    import schce.data._augmentation as aug

    rng = np.random.default_rng(1)
    n = 1000
    labels = np.where(np.arange(n) < 900, "common", "rare")
    groups = rng.integers(0, 20, n).astype(str)
    X = rng.random((n, 3)).astype(np.float32)
    seen = {}
    original = aug._label_group_means

    def spy(X_, labels_, groups_, rows, normalize):
        seen["rows"] = rows
        return original(X_, labels_, groups_, rows, normalize)

    monkeypatch.setattr(aug, "_label_group_means", spy)
    published_augmentation_candidates(X, labels, groups, n_cells=200)
    # With 200 of 1000 cells drawn at 1/frequency, about half come from the rare label (10% of the cells).
    assert len(seen["rows"]) == 200 and len(np.unique(seen["rows"])) == 200
    assert 0.35 < np.mean(labels[seen["rows"]] == "rare") <= 0.5


def test_matrix_is_drawn_from_the_large_kmeans_clusters():
    X, labels, groups = _data(cells_per_group=4)
    candidates, _ = published_augmentation_candidates(X, labels, groups, seed=3)
    clusters = KMeans(n_clusters=2, n_init="auto", random_state=3).fit(candidates).labels_
    sizes = np.bincount(clusters)
    big = sizes[clusters] > 4
    out = published_augmentation_matrix(X, labels, groups, n_clusters=2, min_cluster_size=4, n_rows=5, seed=3)
    assert out.shape == (5, X.shape[1]) and out.dtype == np.float32
    idx = [int(np.flatnonzero(np.all(np.isclose(candidates, row, atol=1e-6), axis=1))[0]) for row in out]
    assert len(set(idx)) == 5 and all(big[i] for i in idx)
    with pytest.raises(ValueError, match="fewer than n_rows=100"):
        published_augmentation_matrix(X, labels, groups, n_clusters=2, min_cluster_size=4, n_rows=100, seed=3)
    with pytest.raises(ValueError, match="no rows"):
        published_augmentation_candidates(X[labels == "B"], labels[labels == "B"], groups[labels == "B"])
    with pytest.raises(ValueError, match="one entry per cell"):
        published_augmentation_candidates(X, labels[:-1], groups)
