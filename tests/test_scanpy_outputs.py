"""Prediction columns ready for scanpy: present categories in hierarchy order, shared colours, voting, unassigned."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
from conftest import shared_file

import schce

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import scanpy as sc

TRUTH = "cell_type_ontology_term_id"


@pytest.fixture(scope="module")
def query(trained, pbmc):
    q = pbmc.copy()
    q.obs["leiden"] = pd.Categorical(np.arange(q.n_obs) % 7).astype(str)  # fixed clusters: a hand-checkable vote
    trained.predict(q, majority_voting=True, over_clustering="leiden", truth_key=TRUTH)
    return q


def _schce_categoricals(adata) -> list[str]:
    return [
        c
        for c in adata.obs.columns
        if c.startswith("schce_") and isinstance(adata.obs[c].dtype, pd.CategoricalDtype)
        and not c.endswith("_unassigned_reason")
    ]  # fmt: skip


def test_categories_are_the_present_values_in_depth_first_hierarchy_order(trained, query):
    columns = _schce_categoricals(query)
    assert {"schce_prediction", "schce_prediction_coarse", "schce_majority_voting"} <= set(columns)
    for column in columns:
        cats = list(query.obs[column].cat.categories)
        counts = query.obs[column].value_counts()
        assert (counts[cats] > 0).all(), column  # no empty category
        ids = cats if column.endswith("_id") else None
        if ids is not None:
            depth_first = [t for t in _depth_first(trained.hierarchy) if t in set(ids)]
            assert ids == depth_first, column
    # the depth-first order keeps every subtree together: T cells are contiguous in the prediction column
    t_cells = trained.hierarchy.descendants("CL:0000084", include_self=True)
    ids = list(query.obs["schce_prediction_ontology_term_id"].cat.categories)
    positions = [i for i, t in enumerate(ids) if t in t_cells]
    assert positions == list(range(positions[0], positions[-1] + 1))


def _depth_first(hierarchy):
    """Independent depth-first walk: roots then children by name, each term at its first visit."""
    children = {t: sorted((c for p, c in hierarchy.edges() if p == t), key=hierarchy.name) for t in hierarchy.terms}
    out, stack = [], sorted((t for t in hierarchy.terms if not hierarchy.parents(t)), key=hierarchy.name)[::-1]
    while stack:
        t = stack.pop()
        if t not in out:
            out.append(t)
            stack.extend(children[t][::-1])
    return out


def test_one_colour_per_cell_type_across_prediction_coarse_vote_and_truth(trained, query):
    h = trained.hierarchy
    colour_of: dict[str, str] = {}
    for column in [*_schce_categoricals(query), TRUTH]:
        colours = query.uns[f"{column}_colors"]
        cats = [str(c) for c in query.obs[column].cat.categories]
        assert len(colours) == len(cats)
        for cat, colour in zip(cats, colours, strict=True):
            term = cat if cat.startswith("CL:") else h.terms[h.names(h.terms).index(cat)]
            assert colour_of.setdefault(term, colour) == colour, (column, cat)
    labels = [t for t in colour_of if t in trained.hierarchy.labels]
    assert len({colour_of[t] for t in labels}) == len(labels)  # distinct labels, distinct colours
    assert "schce_over_clustering" not in query.obs  # clusters were given


def test_majority_voting_in_predict_equals_majority_vote_and_a_hand_count(trained, query):
    again = query.copy()
    out = schce.majority_vote(again, trained.hierarchy, over_clustering="leiden")
    for column in out.columns:
        np.testing.assert_array_equal(query.obs[column].astype(str), out[column].astype(str))
    # by hand: in each cluster, the deepest term whose subtree holds more than half of the cluster's calls
    pred = query.obs["schce_prediction_ontology_term_id"].astype(str)
    h = trained.hierarchy
    for cluster, cells in query.obs.groupby("leiden", observed=True).groups.items():
        calls = pred[cells]
        share = {t: np.mean([c in h.descendants(t, include_self=True) for c in calls]) for t in h.terms}
        winners = [t for t, f in share.items() if f > 0.5]
        best = max(winners, key=lambda t: (h.depth[h.terms.index(t)], share[t]))
        assert set(query.obs.loc[cells, "schce_majority_voting_ontology_term_id"].astype(str)) == {best}, cluster
        np.testing.assert_allclose(query.obs.loc[cells, "schce_majority_voting_fraction"], share[best], rtol=1e-6)


def test_scanpy_dotplot_rank_genes_groups_and_umap_take_every_schce_column(query):
    q = query.copy()
    q.obsm["X_umap"] = np.asarray(q.obsm["X_schce"])[:, :2]
    markers = list(q.var_names[:6])
    for column in _schce_categoricals(q):
        sc.pl.dotplot(q, markers, groupby=column, show=False)
        if (q.obs[column].value_counts() >= 2).all():  # scanpy needs two cells per group
            sc.tl.rank_genes_groups(q, column, method="t-test", key_added=f"rank_{column}")
            assert len(q.uns[f"rank_{column}"]["names"].dtype.names) == q.obs[column].cat.categories.size
    sc.tl.rank_genes_groups(q, "schce_prediction", method="t-test")
    sc.pl.umap(q, color=[*_schce_categoricals(q), TRUTH], show=False)
    plt.close("all")
    assert list(q.uns["schce_prediction_colors"]) == list(query.uns["schce_prediction_colors"])  # scanpy kept ours


def test_min_confidence_calls_unsure_cells_unassigned_with_the_reason(trained, pbmc):
    q = pbmc.copy()
    out = trained.predict(q, min_confidence=0.6)
    low = out["schce_confidence"] < 0.6
    assert low.any() and (~low).any()
    assert (out.loc[low, "schce_prediction"] == "unassigned").all()
    assert (out.loc[low, "schce_prediction_coarse"] == "unassigned").all()
    assert (out.loc[low, "schce_unassigned_reason"] == "confidence below 0.6").all()
    assert out.loc[~low, "schce_unassigned_reason"].isna().all()
    assert list(q.obs["schce_prediction"].cat.categories)[-1] == "unassigned"
    assert q.uns["schce_prediction_colors"][-1] == "#d3d3d3"
    default = trained.predict(pbmc.copy(), inplace=False)  # the default keeps every call
    assert (default["schce_prediction"] != "unassigned").all()
    with pytest.raises(ValueError, match="min_confidence must be in"):
        trained.predict(pbmc.copy(), min_confidence=1.5)


def test_a_pbmc_model_on_pancreas_calls_the_cells_unassigned_for_low_gene_overlap(trained, caplog):
    pancreas = ad.read_h5ad(shared_file("real", "scClassify_pancreas_wang_lognorm_CL.h5ad"))
    out = trained.predict(pancreas)
    overlap = pancreas.uns["schce"]["gene_overlap"]["fraction"]
    assert overlap < 0.1
    unassigned = out["schce_prediction"] == "unassigned"
    assert unassigned.mean() > 0.5
    reasons = out.loc[unassigned, "schce_unassigned_reason"].astype(str)
    assert reasons.str.contains("gene overlap").all() and reasons.str.contains("min_gene_overlap=0.1").all()
    assert "Every cell is called 'unassigned'" in caplog.text
    kept = trained.predict(pancreas.copy(), min_gene_overlap=0, inplace=False)  # the user can still ask
    assert (kept["schce_prediction"] != "unassigned").mean() > 0.5


def test_a_rerun_without_voting_removes_the_earlier_vote(trained, pbmc):
    q = pbmc[:200].copy()
    q.obs["leiden"] = pd.Categorical(np.arange(q.n_obs) % 4).astype(str)
    trained.predict(q, majority_voting=True, over_clustering="leiden")
    assert "schce_majority_voting" in q.obs and "schce_majority_voting_colors" in q.uns
    trained.predict(q)
    assert not [c for c in q.obs.columns if "majority_voting" in c]
    assert "schce_majority_voting_colors" not in q.uns and "leiden" in q.obs  # the user's clusters stay
