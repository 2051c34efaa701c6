"""Plots: the confusion table number by number, each plot's artists, saving, and scanpy's UMAP after predict."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection

import schce
from schce import pl
from schce.evaluation import evaluate_predictions

LABELS = ["T", "CD4", "CD8", "B"]
NAMES = {"root": "cell", "T": "T cell", "CD4": "CD4 T cell", "CD8": "CD8 T cell", "B": "B cell"}
# (truth, predicted label); "X" is unknown and "root" is the root: neither is scorable
CELLS = [
    ("T", "CD4"),  # a descendant of the truth: on the diagonal only when corrected
    ("T", "T"),
    ("CD4", "T"),  # an ancestor of the truth: wrong either way
    ("CD4", "CD4"),
    ("CD8", "CD4"),
    ("B", "B"),
    ("B", "CD8"),
    ("X", "B"),
    ("root", "T"),
]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def toy():
    h = schce.Hierarchy.from_edges(
        [("root", "T"), ("root", "B"), ("T", "CD4"), ("T", "CD8")], labels=LABELS, names=NAMES
    )
    probs = np.full((len(CELLS), len(LABELS)), 0.1)
    for i, (_, p) in enumerate(CELLS):
        probs[i, LABELS.index(p)] = 0.7
    return evaluate_predictions([t for t, _ in CELLS], probs, h, lambda t: set(), groupby=())


@pytest.fixture(scope="module")
def predicted(trained, pbmc):
    adata = pbmc.copy()
    trained.predict(adata)
    return adata


def test_confusion_table_exact_and_corrected(toy):
    exact = pl.confusion_table(toy, corrected=False)
    assert list(exact.index) == LABELS and list(exact.columns) == LABELS
    expected_exact = [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 0.5, 0.5]]
    np.testing.assert_allclose(exact.to_numpy(), expected_exact)
    corrected = pl.confusion_table(toy, corrected=True)
    expected_corrected = [[1, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 0.5, 0.5]]
    np.testing.assert_allclose(corrected.to_numpy(), expected_corrected)
    assert corrected.index.name == "true" and corrected.columns.name == "predicted"


def test_confusion_table_counts_and_column_normalisation(toy):
    counts = pl.confusion_table(toy, corrected=False, normalize=None)
    assert np.issubdtype(counts.to_numpy().dtype, np.integer)
    assert counts.to_numpy().sum() == 7 == toy["n_scored"]  # the unknown term and the root are left out
    assert "X" not in counts.index and "root" not in counts.index
    np.testing.assert_array_equal(counts.to_numpy(), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]])
    by_pred = pl.confusion_table(toy, corrected=False, normalize="pred")
    np.testing.assert_allclose(by_pred.sum(axis=0).to_numpy(), 1.0)
    np.testing.assert_allclose(by_pred.loc["CD8", "CD4"], 1 / 3)
    with pytest.raises(ValueError, match="normalize"):
        pl.confusion_table(toy, normalize="rows")


def test_confusion_table_coarser_truth_gets_its_own_row_and_column():
    h = schce.Hierarchy.from_edges([("root", "L"), ("L", "T"), ("L", "B")], labels=["T", "B"])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    res = evaluate_predictions(["L", "T", "B"], probs, h, lambda t: set(), groupby=())
    table = pl.confusion_table(res, corrected=True, normalize=None)
    assert list(table.index) == ["T", "B", "L"] and list(table.columns) == ["T", "B", "L"]
    assert table.loc["L", "L"] == 1 and table.loc["T", "B"] == 1 and table.loc["B", "B"] == 1


def test_confusion_matrix_plot(toy, tmp_path):
    out = tmp_path / "figs" / "cm.png"
    ax = pl.confusion_matrix(toy, corrected=True, save=out)
    assert ax.get_title() == "Confusion matrix (hierarchy-corrected)"
    assert [t.get_text() for t in ax.get_yticklabels()] == [NAMES[t] for t in LABELS]
    assert len(ax.texts) == 16 and ax.texts[0].get_text() == "1.00"
    np.testing.assert_allclose(ax.images[0].get_array(), pl.confusion_table(toy).to_numpy())
    assert len(ax.get_figure().axes) == 2  # the colorbar
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.parent.glob(".*"))
    ax = pl.confusion_matrix(toy, corrected=False, normalize=None, use_names=False)
    assert ax.get_title() == "Confusion matrix (exact)"
    assert [t.get_text() for t in ax.get_xticklabels()] == LABELS and ax.texts[0].get_text() == "1"


def test_per_class_f1_plot(toy, tmp_path):
    ax = pl.per_class_f1(toy, corrected=True, save=tmp_path / "f1.png")
    n = len(toy.per_class)
    assert len(ax.patches) == 2 * n  # exact beside corrected
    assert ax.get_title() == "Per-class F1 (hierarchy-corrected)"
    # corrected F1: T 0.8, B 2/3, CD4 0.5, CD8 0; best at the top
    assert [t.get_text() for t in ax.get_yticklabels()] == ["T cell", "B cell", "CD4 T cell", "CD8 T cell"]
    widths = [p.get_width() for p in ax.patches[n:]]  # corrected bars, top to bottom in the sort order
    assert widths == sorted(widths, reverse=True)
    assert {t.get_text() for t in ax.texts} == {f"n={int(s)}" for s in toy.per_class["support"]}
    assert (tmp_path / "f1.png").stat().st_size > 0
    ax = pl.per_class_f1(toy, corrected=False)
    assert len(ax.patches) == n and ax.get_title() == "Per-class F1 (exact)"


def _nodes(ax) -> PathCollection:
    (coll,) = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_label() == "terms"]
    return coll


def test_hierarchy_scores_plot(predicted, tmp_path):
    scores = predicted.obsm["schce_hierarchical_scores"]
    terms = list(scores.columns)
    ax = pl.hierarchy_scores(predicted, save=tmp_path / "tree.png")
    nodes = _nodes(ax)
    assert len(nodes.get_offsets()) == len(terms) == len(ax.texts)
    np.testing.assert_allclose(
        nodes.get_array(), scores.to_numpy().mean(0), rtol=1e-5
    )  # float32 scores, summed in another order
    root = terms.index("CL:0000000")
    assert nodes.get_array()[root] == pytest.approx(1.0, abs=1e-5)
    cmap = nodes.get_cmap()
    np.testing.assert_allclose(nodes.to_rgba(nodes.get_array())[root][:3], cmap(1.0)[:3], atol=1e-3)
    # the root is drawn at the top
    assert nodes.get_offsets()[root][1] == max(y for _, y in nodes.get_offsets())
    assert "all cells" in ax.get_title() and (tmp_path / "tree.png").stat().st_size > 0

    b = terms.index("CL:0000236")
    ax_b = pl.hierarchy_scores(predicted, groupby="cell_type", group="B cell", hierarchy=None, min_score=0.2)
    assert _nodes(ax_b).get_array()[b] > nodes.get_array()[b]
    assert "cell_type = B cell" in ax_b.get_title()


def test_hierarchy_scores_with_a_hierarchy_and_errors(predicted, trained, pbmc):
    ax = pl.hierarchy_scores(predicted, hierarchy=trained.hierarchy)
    assert len(_nodes(ax).get_offsets()) == len(trained.hierarchy.terms)
    assert len(ax.collections[0].get_segments()) == len(trained.hierarchy.edges())
    with pytest.raises(KeyError, match=r"schce_hierarchical_scores.*predict"):
        pl.hierarchy_scores(pbmc)
    with pytest.raises(ValueError, match="not a value"):
        pl.hierarchy_scores(predicted, groupby="cell_type", group="hepatocyte")
    with pytest.raises(ValueError, match="not a column"):
        pl.hierarchy_scores(predicted, groupby="no_such_column", group="B cell")


def test_scanpy_umap_of_the_predictions(predicted):
    import scanpy as sc

    adata = predicted.copy()
    sc.pp.neighbors(adata, use_rep="X_schce", random_state=0)
    sc.tl.umap(adata, random_state=0)
    ax = sc.pl.umap(adata, color="schce_prediction", show=False)
    assert ax.get_title() == "schce_prediction"
    shown = {t.get_text() for t in ax.get_legend().get_texts()} if ax.get_legend() else set()
    assert shown <= set(adata.obs["schce_prediction"].cat.categories)
    assert isinstance(adata.obs["schce_prediction"].dtype, pd.CategoricalDtype)


def test_hierarchy_scores_draws_ontology_only_terms_less_prominently(predicted, trained):
    ax = pl.hierarchy_scores(predicted, hierarchy=trained.hierarchy)
    nodes = _nodes(ax)
    terms = list(predicted.obsm["schce_hierarchical_scores"].columns)
    labels = set(trained.hierarchy.labels)
    sizes = np.broadcast_to(nodes.get_sizes(), (len(terms),))
    is_label = np.array([t in labels for t in terms])
    assert is_label.any() and (~is_label).any()
    assert (sizes[is_label] > sizes[~is_label].max()).all()
    texts = {t.get_text().replace("\n", " "): t for t in ax.texts}
    label_text = texts[trained.hierarchy.name("CL:0000236")]
    grouping_text = texts[trained.hierarchy.name("CL:0000542")]  # lymphocyte: an ancestor, not a model label
    assert label_text.get_fontweight() == "bold" and grouping_text.get_fontweight() == "normal"
    assert grouping_text.get_fontsize() < label_text.get_fontsize()
    # without a hierarchy, the labels are the columns of the probabilities
    sizes_default = np.broadcast_to(_nodes(pl.hierarchy_scores(predicted)).get_sizes(), (len(terms),))
    np.testing.assert_allclose(sizes_default, sizes)


def test_hierarchy_scores_plot_reads_sparse_scores(predicted, trained):
    """``hierarchical_scores="sparse"``: the terms come from uns; each node is the mean with left-out scores as 0."""
    query = predicted.copy()
    trained.predict(query, hierarchical_scores="sparse")
    scores = query.obsm["schce_hierarchical_scores"]
    ax = pl.hierarchy_scores(query)
    nodes = _nodes(ax)
    assert len(nodes.get_offsets()) == len(trained.hierarchy.terms)
    np.testing.assert_allclose(nodes.get_array(), np.asarray(scores.mean(axis=0)).ravel(), rtol=1e-5)
    dense = predicted.obsm["schce_hierarchical_scores"].to_numpy().mean(0)
    assert (nodes.get_array() <= dense + 1e-5).all()  # left-out scores count as 0
    root = list(query.uns["schce"]["terms"]).index("CL:0000000")
    assert nodes.get_array()[root] == pytest.approx(1.0, abs=1e-5)
