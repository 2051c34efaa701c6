"""Issue 24: predict never overwrites what the user wrote; cells without expression are 'unassigned'."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData

from schce._output import UNASSIGNED


def _query(pbmc):
    q = pbmc.copy()
    q.obs = q.obs[["phase"]].copy()
    return q


def test_a_users_column_of_the_same_name_is_never_overwritten(trained, pbmc):
    query = _query(pbmc)
    truth = pbmc.obs["cell_type_ontology_term_id"].astype(str).to_numpy()
    query.obs["schce_prediction_ontology_term_id"] = truth
    with pytest.raises(ValueError, match=r"obs\['schce_prediction_ontology_term_id'\], which schce did not write"):
        trained.predict(query)
    assert (query.obs["schce_prediction_ontology_term_id"].to_numpy() == truth).all()
    assert "schce_prediction" not in query.obs and "schce" not in query.uns  # refused before writing anything
    trained.predict(query, key_added="pred")  # the way out the message names
    assert (query.obs["schce_prediction_ontology_term_id"].to_numpy() == truth).all()
    trained.predict(query, overwrite=True)  # or say so
    assert query.obs["schce_prediction_ontology_term_id"].dtype == "category"


@pytest.mark.parametrize(("place", "key"), [("obsm", "X_schce"), ("uns", "schce")])
def test_foreign_obsm_and_uns_entries_are_refused(trained, pbmc, place, key):
    query = _query(pbmc)
    getattr(query, place)[key] = np.zeros((query.n_obs, 2)) if place == "obsm" else {"mine": 1}
    with pytest.raises(ValueError, match=rf"{place}\['{key}'\].*key_added=.*overwrite=True"):
        trained.predict(query)
    assert "schce_prediction" not in query.obs


def test_rerunning_predict_replaces_its_own_keys_with_a_log_line(trained, pbmc, caplog):
    query = _query(pbmc)
    trained.predict(query)
    written = query.uns["schce"]["written"]
    assert "schce_prediction" in written["obs"] and "X_schce" in written["obsm"]
    with caplog.at_level(logging.INFO, logger="schce"):
        trained.predict(query, coarse_threshold=0.9)
    assert "Overwriting earlier schce outputs" in caplog.text
    assert query.uns["schce"]["coarse_threshold"] == 0.9


def test_rerun_after_an_h5ad_round_trip_is_still_recognised(trained, pbmc, tmp_path):
    import anndata as ad

    query = _query(pbmc)
    trained.predict(query)
    query.write_h5ad(tmp_path / "q.h5ad")
    back = ad.read_h5ad(tmp_path / "q.h5ad")
    trained.predict(back)  # uns lists come back as arrays; still schce's own keys
    assert back.uns["schce"]["n_labels"] == trained.hierarchy.n_labels


@pytest.mark.parametrize("key", ["", " ", "a/b", None, "_x"])
def test_bad_key_added_is_refused(trained, pbmc, key):
    query = _query(pbmc)
    with pytest.raises(ValueError, match="key_added must be a non-empty name"):
        trained.predict(query, key_added=key)
    assert list(query.obs.columns) == ["phase"]


def test_all_zero_cells_are_unassigned_with_a_reason(trained, pbmc, caplog):
    query = _query(pbmc)
    X = query.X.tolil()
    X[[3, 10], :] = 0
    query.X = sp.csr_matrix(X)
    with caplog.at_level(logging.WARNING, logger="schce"):
        df = trained.predict(query)
    assert "2 of 700 cell(s) have no expression in the model's genes" in caplog.text
    assert (df["schce_prediction"].iloc[[3, 10]] == UNASSIGNED).all()
    assert (df["schce_prediction_ontology_term_id"].iloc[[3, 10]] == UNASSIGNED).all()
    np.testing.assert_allclose(df["schce_confidence"].iloc[[3, 10]].to_numpy(), 0.0, atol=0)
    reason = query.obs["schce_unassigned_reason"]
    assert (reason.iloc[[3, 10]] == "no expression in the model's genes").all()
    assert reason.isna().sum() == query.n_obs - 2
    assert (df["schce_prediction"].drop(df.index[[3, 10]]) != UNASSIGNED).all()
    assert (df["schce_confidence"].drop(df.index[[3, 10]]) > 0).all()


def test_cells_expressing_only_genes_the_model_lacks_are_unassigned(trained, pbmc):
    query = _query(pbmc)[:20].copy()
    extra = sp.csr_matrix(np.full((20, 1), 5.0, dtype=np.float32))
    X = sp.hstack([query.X, extra]).tocsr().tolil()
    X[0, : query.n_vars] = 0  # cell 0 expresses only the extra gene
    adata = AnnData(
        X=sp.csr_matrix(X), obs=query.obs.copy(), var=pd.DataFrame(index=[*query.var_names, "NOT_A_MODEL_GENE"])
    )
    df = trained.predict(adata, inplace=False)
    assert df["schce_prediction"].iloc[0] == UNASSIGNED and (df["schce_prediction"].iloc[1:] != UNASSIGNED).all()


def test_evaluate_names_a_missing_groupby_column(trained, pbmc):
    adata = pbmc.copy()
    with pytest.raises(KeyError, match=r"groupby column\(s\) \['tisue'\] are not in adata.obs; available: \["):
        trained.evaluate(adata, "cell_type_ontology_term_id", groupby=["tisue"])
    result = trained.evaluate(adata, "cell_type_ontology_term_id")  # default columns: absent ones are skipped
    assert result.per_group == {} or all(k in adata.obs for k in result.per_group)
    grouped = trained.evaluate(adata, "cell_type_ontology_term_id", groupby=["phase"])
    assert set(grouped.per_group) == {"phase"}


def test_evaluate_on_a_store_names_a_missing_groupby_column_before_any_work(tmp_path, monkeypatch):
    """The datamodule path too: a named column the split's metadata lacks is an error, not silently skipped."""
    import schce
    from schce.data import SCTabStoreDataModule, write_sctab_store

    atlas = schce.datasets.simulate_atlas(400, n_genes=40, n_cell_types=4, library_size=200, seed=0, progress=False)
    store = write_sctab_store(atlas, tmp_path / "store", split_key="donor_id")
    dm = SCTabStoreDataModule(store, batch_size=64, num_workers=0)
    model = schce.HCEClassifier.from_sctab_store(store, n_hidden=8, n_layers=1)
    model.is_trained_ = True  # the check comes first: no pass over the data is needed to fail
    monkeypatch.setattr(dm, "test_dataloader", lambda: pytest.fail("the data were read before the check"))
    expected = r"groupby column\(s\) \['tisue'\] are not in the test split's obs; available: \["
    with pytest.raises(KeyError, match=expected):
        model.evaluate(datamodule=dm, groupby=["tisue"])
