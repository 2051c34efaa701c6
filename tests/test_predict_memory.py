"""Issue 24: predict scores cells batch by batch and stores only what is asked for (bounded memory on large queries).

The 200,000-cell figure is ``python benchmarks/predict_memory.py``; these tests pin the behaviour behind it.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _private import CHUNK_CELLS, SPARSE_SCORE_MIN, SPARSE_TOP, PredictionAccumulator, prediction_frame

from schce import Hierarchy


def _wide_hierarchy(n_groups: int = 6, per_group: int = 8) -> Hierarchy:
    """Labels ``g{i}_{j}`` under group terms ``g{i}`` under a root ``R``; the groups are labels too."""
    groups = [f"g{i}" for i in range(n_groups)]
    leaves = [f"{g}_{j}" for g in groups for j in range(per_group)]
    edges = [("R", g) for g in groups] + [(leaf.split("_")[0], leaf) for leaf in leaves]
    return Hierarchy(groups + leaves, edges)


def _probabilities(n: int, n_labels: int, seed: int = 0, concentration: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(n_labels, concentration), size=n)


def _query(pbmc):
    q = pbmc.copy()
    q.obs = q.obs[["phase"]].copy()
    return q


def test_chunked_scoring_equals_the_whole_matrix():
    h = _wide_hierarchy()
    n = 2 * CHUNK_CELLS + 7  # three chunks, the last one short
    p = _probabilities(n, h.n_labels)
    obs, obsm = prediction_frame(p, h, pd.RangeIndex(n).astype(str), "k", 0.4)
    whole = h.subtree_scores(p)
    terms = np.asarray(h.terms, dtype=object)
    coarse = terms[h.coarse_terms(whole, 0.4)]
    assert (obs["k_prediction_coarse_ontology_term_id"].astype(str).to_numpy() == coarse).all()
    assert (obs["k_prediction_ontology_term_id"].astype(str).to_numpy() == np.asarray(h.labels)[p.argmax(1)]).all()
    np.testing.assert_allclose(obs["k_confidence"].to_numpy(), p.max(1), rtol=1e-6)
    scores = obsm["k_hierarchical_scores"]
    assert scores.dtypes.unique().tolist() == [np.float32] and list(scores.columns) == list(h.terms)
    np.testing.assert_allclose(scores.to_numpy(), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(obsm["k_probabilities"].to_numpy(), p, rtol=1e-6, atol=1e-7)


def test_sparse_scores_keep_each_cells_highest_scores():
    h = _wide_hierarchy()  # 55 terms: more than SPARSE_TOP
    n = 300
    p = _probabilities(n, h.n_labels, seed=1)
    p[0] = 0.0
    p[0, h.labels.index("g2_5")] = 1.0  # a certain cell: only its chain R > g2 > g2_5 scores
    obs, obsm = prediction_frame(p, h, pd.RangeIndex(n).astype(str), "k", 0.5, hierarchical_scores="sparse")
    dense = h.subtree_scores(p)
    scores = obsm["k_hierarchical_scores"]
    assert sp.issparse(scores) and scores.format == "csr" and scores.dtype == np.float32
    assert scores.shape == (n, len(h.terms))
    assert sorted(np.asarray(h.terms)[scores[0].indices]) == ["R", "g2", "g2_5"]
    np.testing.assert_allclose(scores[0].data, 1.0)
    counts = np.diff(scores.indptr)
    assert counts.max() <= SPARSE_TOP and (counts == SPARSE_TOP).any()
    for i in range(n):
        row = scores[i]
        np.testing.assert_allclose(row.data, dense[i, row.indices], rtol=1e-6)
        assert (row.data >= SPARSE_SCORE_MIN).all()
        left_out = np.delete(dense[i], row.indices)
        if len(row.data) == SPARSE_TOP:  # a full row: nothing left out scores above what was kept
            assert left_out.max() <= row.data.min() + 1e-7
        else:  # a short row: everything left out is below the floor
            assert (left_out < SPARSE_SCORE_MIN).all()
    dense_obs, _ = prediction_frame(p, h, pd.RangeIndex(n).astype(str), "k", 0.5)
    pd.testing.assert_frame_equal(obs, dense_obs)  # the calls do not depend on the stored form


@pytest.mark.parametrize("stored", ["none", "dense"])
def test_accumulator_memory_is_the_outputs_plus_one_batch(stored):
    """Traced allocations while scoring 20,000 cells: the stored outputs and one batch, never cells × terms in
    float64 (9.5 MiB here, more than the bound)."""
    h = _wide_hierarchy(10, 5)  # 60 terms, 60 labels
    n, batch = 20_000, 500
    p = _probabilities(batch, h.n_labels)
    tracemalloc.start()
    try:
        acc = PredictionAccumulator(h, n, 0.5, probabilities=stored == "dense", hierarchical_scores=stored)
        for _ in range(n // batch):
            acc.add(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    outputs = n * (8 + 8 + 4) + (n * (h.n_labels + len(h.terms)) * 4 if stored == "dense" else 0)
    per_batch = 8 * batch * len(h.terms) * 8  # a generous allowance for one batch's temporaries
    assert peak <= outputs + per_batch, (peak, outputs, per_batch)
    assert n * len(h.terms) * 8 > per_batch + n * 20  # the bound would catch a float64 cells × terms matrix
    assert acc.filled == n


def test_predict_scores_every_batch_on_its_own(trained, pbmc, monkeypatch):
    """No call of the scoring rules ever sees more cells than one batch; batch size does not change the results."""
    reference = _query(pbmc)
    trained.predict(reference, batch_size=1024)
    rows = {"subtree_scores": [], "coarse_terms": []}
    for name in rows:
        original = getattr(Hierarchy, name)

        def spy(self, values, *args, _name=name, _original=original, **kwargs):
            rows[_name].append(len(values))
            return _original(self, values, *args, **kwargs)

        monkeypatch.setattr(Hierarchy, name, spy)
    query = _query(pbmc)
    trained.predict(query, batch_size=128)
    for name, seen in rows.items():
        assert seen and max(seen) <= 128 and sum(seen) == pbmc.n_obs, (name, seen)
    written = ["schce_prediction_ontology_term_id", "schce_prediction_coarse_ontology_term_id"]
    pd.testing.assert_frame_equal(query.obs[written], reference.obs[written])
    for key in ("schce_probabilities", "schce_hierarchical_scores", "X_schce"):
        np.testing.assert_allclose(np.asarray(query.obsm[key]), np.asarray(reference.obsm[key]), atol=1e-5)


def test_predict_stores_the_hierarchical_scores_asked_for(trained, pbmc, tmp_path):
    import anndata as ad

    dense = _query(pbmc)
    trained.predict(dense)
    query = _query(pbmc)
    trained.predict(query, hierarchical_scores="sparse")
    scores = query.obsm["schce_hierarchical_scores"]
    assert sp.issparse(scores) and query.uns["schce"]["hierarchical_scores"] == "sparse"
    terms = list(query.uns["schce"]["terms"])
    assert terms == list(trained.hierarchy.terms) == list(dense.obsm["schce_hierarchical_scores"].columns)
    full = dense.obsm["schce_hierarchical_scores"].to_numpy()
    coo = scores.tocoo()
    np.testing.assert_allclose(coo.data, full[coo.row, coo.col], rtol=1e-6)
    pd.testing.assert_frame_equal(query.obs, dense.obs)
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    assert (back.obsm["schce_hierarchical_scores"] != scores).nnz == 0
    assert list(back.uns["schce"]["terms"]) == terms

    trained.predict(query, hierarchical_scores="none")  # schce's earlier scores go; nothing stale stays
    assert "schce_hierarchical_scores" not in query.obsm
    assert "schce_hierarchical_scores" not in query.uns["schce"]["written"]["obsm"]
    assert query.uns["schce"]["hierarchical_scores"] == "none" and "terms" not in query.uns["schce"]


def test_scores_not_stored_leave_a_users_entry_of_that_name_alone(trained, pbmc):
    query = _query(pbmc)
    mine = np.arange(query.n_obs * 2, dtype=float).reshape(-1, 2)
    query.obsm["schce_hierarchical_scores"] = mine
    with pytest.raises(ValueError, match=r"obsm\['schce_hierarchical_scores'\], which schce did not write"):
        trained.predict(query)
    trained.predict(query, hierarchical_scores="none")  # not written, so not in the way
    assert query.obsm["schce_hierarchical_scores"] is not None
    np.testing.assert_array_equal(query.obsm["schce_hierarchical_scores"], mine)
    trained.predict(query, hierarchical_scores="none")  # a rerun leaves it too: it is not schce's
    np.testing.assert_array_equal(query.obsm["schce_hierarchical_scores"], mine)


def test_inplace_false_returns_the_calls_only(trained, pbmc):
    query = _query(pbmc)
    before = set(query.obsm) | set(query.uns)
    obs = trained.predict(query, inplace=False)
    assert set(query.obsm) | set(query.uns) == before and list(query.obs.columns) == ["phase"]
    reference = _query(pbmc)
    trained.predict(reference)
    pd.testing.assert_frame_equal(obs, reference.obs[obs.columns])


def test_unknown_hierarchical_scores_choice_is_refused_before_any_work(trained, pbmc):
    query = _query(pbmc)
    with pytest.raises(
        ValueError, match=r"hierarchical_scores must be one of \['dense', 'sparse', 'none'\], got 'top'"
    ):
        trained.predict(query, hierarchical_scores="top")
    assert list(query.obs.columns) == ["phase"] and not query.obsm and "schce" not in query.uns
