"""``schce predict`` writes a CSV of the calls beside the h5ad, majority votes on request, and standard figures."""

from __future__ import annotations

import anndata as ad
import pandas as pd
from click.testing import CliRunner

from schce.cli import cli


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_predict_writes_the_calls_as_csv_with_votes_and_the_figures(trained, pbmc, tmp_path):
    trained.save(tmp_path / "model")
    query = tmp_path / "query.h5ad"
    pbmc[:300].copy().write_h5ad(query)
    out = tmp_path / "annotated.h5ad"
    result = _run("predict", tmp_path / "model", query, "--out", out, "--majority-voting", "--min-confidence", 0.3,
                  "--figures", tmp_path / "figs")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Wrote {out} and {tmp_path / 'annotated.csv'}" in result.output
    table = pd.read_csv(tmp_path / "annotated.csv", index_col="cell")
    annotated = ad.read_h5ad(out)
    assert list(table.index) == list(annotated.obs_names)
    for column in ["schce_prediction", "schce_confidence", "schce_prediction_coarse", "schce_majority_voting",
                   "schce_majority_voting_fraction", "schce_unassigned_reason"]:  # fmt: skip
        assert column in table.columns
    pd.testing.assert_series_equal(
        table["schce_prediction"], annotated.obs["schce_prediction"].astype(str), check_names=False
    )
    low = table["schce_confidence"] < 0.3
    assert (table.loc[low, "schce_prediction"] == "unassigned").all()
    assert (table.loc[~low, "schce_prediction"] != "unassigned").all()
    for name in ("umap.png", "prediction_counts.png", "confidence.png"):
        assert (tmp_path / "figs" / name).stat().st_size > 1000
    assert "X_umap" not in annotated.obsm  # the figures did not change the output
    again = _run("predict", tmp_path / "model", query, "--out", tmp_path / "other.h5ad", "--over-clustering", "x")
    assert again.exit_code != 0 and "over-clustering" in again.output


def test_predict_stores_the_hierarchical_scores_asked_for(trained, pbmc, tmp_path):
    import scipy.sparse as sp

    trained.save(tmp_path / "model")
    query = tmp_path / "query.h5ad"
    pbmc[:200].copy().write_h5ad(query)
    for choice in ("sparse", "none"):
        out = tmp_path / f"{choice}.h5ad"
        result = _run("predict", tmp_path / "model", query, "--out", out, "--hierarchical-scores", choice)
        assert result.exit_code == 0, result.output
        annotated = ad.read_h5ad(out)
        assert annotated.uns["schce"]["hierarchical_scores"] == choice
        assert ("schce_hierarchical_scores" in annotated.obsm) == (choice == "sparse")
    assert sp.issparse(ad.read_h5ad(tmp_path / "sparse.h5ad").obsm["schce_hierarchical_scores"])
    bad = _run("predict", tmp_path / "model", query, "--out", tmp_path / "x.h5ad", "--hierarchical-scores", "top")
    assert bad.exit_code != 0 and "'top' is not one of 'dense', 'sparse', 'none'" in bad.output
