"""Majority voting over clusters: subtree-aware, against hand computations and an independent implementation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_MLP

import schce
from schce.hierarchy import Hierarchy
from schce.voting import default_resolution, majority_vote, over_cluster, vote

# root -> T -> {CD4, CD8}; root -> B
TOY = Hierarchy(
    ["CD4", "CD8", "T", "B"],
    [("root", "T"), ("T", "CD4"), ("T", "CD8"), ("root", "B")],
    names={"CD4": "CD4 T", "CD8": "CD8 T", "T": "T cell", "B": "B cell", "root": "cell"},
)


def test_vote_by_hand():
    cases = {  # cluster: (its predictions, expected vote, expected support)
        "siblings": (["CD4"] * 3 + ["CD8"] * 2 + ["B"], "T", 5 / 6),  # CD4 has exactly half: not a majority
        "clear": (["CD4"] * 3 + ["CD8"], "CD4", 3 / 4),
        "with unassigned": (["B"] * 4 + ["unassigned"], "B", 4 / 5),
        "mostly unassigned": (["CD4"] + ["unassigned"] * 3, "unassigned", 3 / 4),
        "split at the root": (["CD4", "CD8", "B", "B"], "root", 1.0),
    }
    predictions = np.concatenate([cells for cells, _, _ in cases.values()])
    clusters = np.concatenate([[name] * len(cells) for name, (cells, _, _) in cases.items()])
    terms, support = vote(predictions, clusters, TOY)
    for name, (_, want_term, want_support) in cases.items():
        rows = clusters == name
        assert set(terms[rows]) == {want_term}, name
        np.testing.assert_allclose(support[rows], want_support, rtol=1e-6, err_msg=name)


def test_vote_min_fraction_and_its_bounds():
    terms, _ = vote(["CD4"] * 3 + ["CD8"], ["a"] * 4, TOY, min_fraction=0.8)
    assert set(terms) == {"T"}  # CD4's 0.75 is not enough at 0.8
    with pytest.raises(ValueError, match=r"min_fraction must be in \[0.5, 1\)"):
        vote(["CD4"], ["a"], TOY, min_fraction=0.3)


def test_default_resolution_follows_cell_numbers():
    assert [default_resolution(n) for n in (700, 5_000, 30_000, 99_999, 150_000, 10**6)] == [5, 10, 15, 20, 25, 30]


def _independent_vote(pred: pd.Series, clusters: pd.Series, hierarchy: Hierarchy) -> dict:
    """Per cluster: the deepest term whose subtree holds more than half of the cluster's calls (plain Python)."""
    out = {}
    for cluster, calls in pred.groupby(clusters, observed=True):
        calls = calls.astype(str).tolist()
        best = None
        for term in hierarchy.terms:
            subtree = hierarchy.descendants(term, include_self=True)
            share = sum(c in subtree for c in calls) / len(calls)
            depth = hierarchy.depth[hierarchy.terms.index(term)]
            if share > 0.5 and (best is None or (depth, share) > best[:2]):
                best = (depth, share, term)
        out[cluster] = (best[2], best[1]) if best else ("unassigned", None)
    return out


def test_majority_vote_on_pbmc_matches_an_independent_computation(pbmc):
    ref = pbmc.copy()
    schce.HCEClassifier.setup_anndata(ref, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(ref, **SMALL_MLP)
    model.train(max_epochs=3, seed=0, enable_progress_bar=False)
    query = pbmc.copy()
    query.obs["cluster"] = pd.Categorical(query.obs["bulk_labels"].astype(str).str[:6])  # a user clustering
    model.predict(query)
    before = query.obs.drop(columns=[c for c in query.obs if c.startswith("schce_majority")]).copy()
    out = majority_vote(query, model.hierarchy, over_clustering="cluster")
    expected = _independent_vote(query.obs["schce_prediction_ontology_term_id"], query.obs["cluster"], model.hierarchy)
    for cluster, (term, share) in expected.items():
        rows = (query.obs["cluster"] == cluster).to_numpy()
        assert set(out["schce_majority_voting_ontology_term_id"][rows].astype(str)) == {term}, cluster
        np.testing.assert_allclose(out["schce_majority_voting_fraction"][rows], share, rtol=1e-6)
        assert set(out["schce_majority_voting"][rows].astype(str)) == {model.hierarchy.name(term)}
    pd.testing.assert_frame_equal(query.obs[before.columns], before)  # nothing else in obs changed
    assert list(out.columns) == [
        "schce_majority_voting",
        "schce_majority_voting_ontology_term_id",
        "schce_majority_voting_fraction",
    ]


def test_majority_vote_over_clusters_the_embedding_itself(trained, pbmc):
    query = pbmc.copy()
    trained.predict(query)
    obsp, uns = set(query.obsp.keys()), set(query.uns.keys())
    out = majority_vote(query, trained.hierarchy)
    clusters = out["schce_over_clustering"]
    assert 10 <= clusters.nunique() < 200  # fine clusters at resolution 5 for 700 cells
    assert set(query.obsp.keys()) == obsp and set(query.uns.keys()) == uns  # the graph stays private
    # within each cluster the vote is constant and supported by more than half of it
    by_cluster = out.groupby("schce_over_clustering", observed=True)
    assert (by_cluster["schce_majority_voting_ontology_term_id"].nunique() == 1).all()
    assert (out["schce_majority_voting_fraction"] > 0.5).all()


def test_majority_vote_explains_missing_inputs(pbmc):
    with pytest.raises(KeyError, match=r"run model.predict\(adata, key_added='schce'\) first"):
        majority_vote(pbmc.copy(), TOY)
    with pytest.raises(ValueError, match="key_added must be a non-empty name"):
        majority_vote(pbmc.copy(), TOY, key_added="")


def _voted_query(pbmc, model):
    query = pbmc.copy()
    query.obs["cluster"] = pd.Categorical(query.obs["bulk_labels"].astype(str).str[:6])
    model.predict(query)
    return query


def test_majority_vote_never_overwrites_a_users_column(trained, pbmc):
    """The rule predict uses (issue 24): a column of an output name that schce did not write is refused, named,
    before any work; overwrite=True replaces it."""
    query = _voted_query(pbmc, trained)
    mine = np.where(np.arange(query.n_obs) % 2, "x", "y")
    query.obs["schce_majority_voting"] = mine
    before = query.obs.copy()
    with pytest.raises(ValueError, match=r"obs\['schce_majority_voting'\], which schce did not write.*overwrite=True"):
        majority_vote(query, trained.hierarchy, over_clustering="cluster")
    pd.testing.assert_frame_equal(query.obs, before)  # nothing written
    out = majority_vote(query, trained.hierarchy, over_clustering="cluster", overwrite=True)
    assert (query.obs["schce_majority_voting"].astype(str) == out["schce_majority_voting"].astype(str)).all()


def test_majority_vote_reruns_replace_its_own_columns(trained, pbmc, caplog):
    import logging

    query = _voted_query(pbmc, trained)
    majority_vote(query, trained.hierarchy)  # automatic over-clustering
    assert "schce_over_clustering" in query.uns["schce"]["written"]["obs"]
    with caplog.at_level(logging.INFO, logger="schce"):
        out = majority_vote(query, trained.hierarchy, over_clustering="cluster")  # recognised as schce's own
    assert "Overwriting earlier schce outputs: obs['schce_majority_voting']" in caplog.text
    assert "schce_over_clustering" not in query.obs  # the earlier vote's clusters go with it
    written = list(query.uns["schce"]["written"]["obs"])
    assert "schce_over_clustering" not in written and "schce_majority_voting_fraction" in written
    assert "schce_prediction" in written  # predict's record is kept
    np.testing.assert_array_equal(query.obs["schce_majority_voting_fraction"], out["schce_majority_voting_fraction"])
    trained.predict(query)  # predict recognises the vote as schce's and removes it (it did not vote this time)
    assert "schce_majority_voting" not in query.obs


def test_majority_vote_on_predictions_schce_did_not_record(pbmc):
    """Predictions from elsewhere (no uns record): the vote is written and recorded, so a rerun replaces it."""
    query = pbmc.copy()
    labels = np.array(["CD4", "CD8", "B"])[np.arange(query.n_obs) % 3]
    query.obs["schce_prediction_ontology_term_id"] = labels
    query.obs["cluster"] = np.arange(query.n_obs) % 4
    majority_vote(query, TOY, over_clustering="cluster")
    assert list(query.uns["schce"]["written"]["obs"]) == [
        "schce_majority_voting",
        "schce_majority_voting_ontology_term_id",
        "schce_majority_voting_fraction",
    ]
    majority_vote(query, TOY, over_clustering="cluster", min_fraction=0.6)  # its own columns: replaced
    assert (query.obs["schce_prediction_ontology_term_id"] == labels).all()
    query.uns["schce"] = {"mine": 1}  # a foreign uns entry of that name is refused as predict refuses it
    with pytest.raises(ValueError, match=r"uns\['schce'\], which schce did not write"):
        majority_vote(query, TOY, over_clustering="cluster")
    assert query.uns["schce"] == {"mine": 1}


def test_over_clustering_keeps_torch_thread_count():
    """scanpy's neighbours (numba's OpenMP start-up) reset the OpenMP thread count torch shares; it is put back."""
    import torch

    threads = torch.get_num_threads()
    emb = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            clusters = over_cluster(emb)
            assert len(clusters) == 200
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)
