"""MuData input and output: training on the RNA modality of an RNA + protein MuData."""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SMALL_MLP, assert_unchanged, snapshot

import schce

LABELS = "cell_type_ontology_term_id"


def _mudata(pbmc) -> md.MuData:
    """The PBMC counts as modality "rna" (in a layer; X holds zeros) beside a synthetic 12-protein panel "prot"."""
    rna = pbmc.copy()
    rna.layers["counts"] = rna.X.copy()
    rna.X = sp.csr_matrix(rna.shape, dtype=np.float32)
    rng = np.random.default_rng(0)
    prot = ad.AnnData(
        rng.poisson(20, size=(pbmc.n_obs, 12)).astype(np.float32),
        obs=pd.DataFrame(index=pbmc.obs_names),
        var=pd.DataFrame(index=[f"CD{i}_TotalSeqB" for i in range(12)]),
    )
    return md.MuData({"rna": rna, "prot": prot})


@pytest.fixture(scope="module")
def mudata_model(pbmc):
    mdata = _mudata(pbmc)
    schce.HCEClassifier.setup_mudata(
        mdata, LABELS, rna_layer="counts", modalities={"rna_layer": "rna", "labels_key": "rna"}
    )
    model = schce.HCEClassifier(mdata, **SMALL_MLP)
    model.train(max_epochs=3, seed=0, enable_progress_bar=False)
    return model


def test_train_and_predict_on_the_rna_modality(pbmc, mudata_model):
    model = mudata_model
    assert model.registry_["setup_method_name"] == "setup_mudata"
    assert model.genes == list(pbmc.var_names)
    query = _mudata(pbmc)
    prot_before = snapshot(query["prot"])
    df = model.predict(query, layer="counts")
    rna = query["rna"]
    # The output contract in the RNA modality, the predictions pulled into mdata.obs.
    assert {"schce_prediction", "schce_confidence", "schce_prediction_coarse"} <= set(rna.obs.columns)
    assert rna.obsm["schce_probabilities"].shape == (pbmc.n_obs, model.hierarchy.n_labels)
    assert "X_schce" in rna.obsm and "schce" in rna.uns
    assert (query.obs["rna:schce_prediction"].astype(str) == df["schce_prediction"].astype(str)).all()
    assert_unchanged(query["prot"], prot_before)
    # The same as predicting the RNA AnnData directly.
    direct = model.predict(pbmc.copy(), inplace=False)
    np.testing.assert_allclose(df["schce_confidence"], direct["schce_confidence"], atol=1e-6)
    # Without a query, the registered MuData and its registered layer are used.
    model.predict()
    assert "rna:schce_prediction" in model.adata.obs.columns
    np.testing.assert_allclose(model.adata["rna"].obs["schce_confidence"], direct["schce_confidence"], atol=1e-6)
    assert model.get_latent_representation(query, layer="counts").shape == (pbmc.n_obs, SMALL_MLP["n_hidden"])


def test_evaluate_accepts_mudata(pbmc, mudata_model):
    query = _mudata(pbmc)
    res = mudata_model.evaluate(query, LABELS, layer="counts")
    assert res["n_cells"] == pbmc.n_obs if "n_cells" in res.overall.index else True
    ref = mudata_model.evaluate(pbmc, LABELS)
    assert res["corrected_macro_f1"] == pytest.approx(ref["corrected_macro_f1"])
    # Labels only in mdata.obs (e.g. pulled with mdata.update()) are found there.
    query.update()
    query["rna"].obs = query["rna"].obs.drop(columns=[LABELS])
    assert mudata_model.evaluate(query, f"rna:{LABELS}", layer="counts")["corrected_macro_f1"] == pytest.approx(
        ref["corrected_macro_f1"]
    )


def test_save_load_keeps_modalities_and_gene_lists(tmp_path, pbmc, mudata_model):
    mudata_model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m")
    genes = loaded.setup_state.modality_genes
    assert genes == {"rna": list(pbmc.var_names), "prot": [f"CD{i}_TotalSeqB" for i in range(12)]}
    assert loaded.registry_["setup_args"]["modalities"] == {"rna_layer": "rna", "labels_key": "rna"}
    assert loaded.genes == list(pbmc.var_names)
    query = _mudata(pbmc)
    df = loaded.predict(query, layer="counts")
    ref = mudata_model.predict(pbmc.copy(), inplace=False)
    np.testing.assert_allclose(df["schce_confidence"], ref["schce_confidence"], atol=1e-6)
    assert "rna:schce_prediction" in query.obs.columns


def test_labels_in_mdata_obs_and_fine_tune(pbmc):
    mdata = _mudata(pbmc)
    mdata.obs["truth"] = pbmc.obs["cell_type"].astype(str).to_numpy()  # CL names, at the MuData level
    schce.HCEClassifier.setup_mudata(mdata, "truth", rna_layer="counts")
    model = schce.HCEClassifier(mdata, **SMALL_MLP)
    assert model.hierarchy.n_labels == pbmc.obs[LABELS].nunique()
    model.train(max_epochs=2, seed=0, enable_progress_bar=False)
    assert model.fine_tune(mdata, "truth", layer="counts", max_epochs=2, seed=0, enable_progress_bar=False) == []


def test_bad_mudata_input(pbmc):
    mdata = _mudata(pbmc)
    before = snapshot(mdata["rna"])
    with pytest.raises(KeyError, match=r"not a modality of mdata; it has \['rna', 'prot'\]"):
        schce.HCEClassifier.setup_mudata(mdata, LABELS, modalities={"rna_layer": "gex"})
    with pytest.raises(KeyError, match=r"not a column of mdata.obs; it is in modality 'rna'"):
        schce.HCEClassifier.setup_mudata(mdata, LABELS, rna_layer="counts")
    with pytest.raises(ValueError, match="Extraneous modality"):
        schce.HCEClassifier.setup_mudata(mdata, LABELS, modalities={"rna_layer": "rna", "protein_layer": "prot"})
    with pytest.raises(TypeError, match="use setup_anndata"):
        schce.HCEClassifier.setup_mudata(pbmc.copy(), LABELS)
    assert_unchanged(mdata["rna"], before)
    partial = md.MuData({"rna": pbmc[:500].copy(), "prot": mdata["prot"].copy()})
    with pytest.raises(ValueError, match="intersect_obs"):
        schce.HCEClassifier.setup_mudata(partial, LABELS, modalities={"rna_layer": "rna", "labels_key": "rna"})


def test_predict_needs_the_rna_modality(pbmc, mudata_model):
    other = md.MuData({"gex": pbmc.copy()})
    with pytest.raises(KeyError, match=r"no modality 'rna' \(it has \['gex'\]\)"):
        mudata_model.predict(other)
    df = mudata_model.predict(other["gex"], inplace=False)  # the modality itself works
    assert len(df) == pbmc.n_obs


def _with_batches(obs: pd.DataFrame, missing: list[int]) -> None:
    obs["batch"] = np.where(np.arange(len(obs)) % 2, "a", "b")
    obs.loc[obs.index[missing], "batch"] = np.nan


@pytest.mark.parametrize("place", ["mdata", "rna"])
def test_missing_batch_values_are_named_and_every_obs_is_left_alone(pbmc, place):
    """As setup_anndata (issue 24): the column, the count and the cells are named; nothing is written."""
    mdata = _mudata(pbmc)
    _with_batches(mdata.obs if place == "mdata" else mdata["rna"].obs, [4, 9])
    modalities = {"rna_layer": "rna", "labels_key": "rna", **({"batch_key": "rna"} if place == "rna" else {})}
    obs = {name: data.obs.copy() for name, data in [("mdata", mdata), *mdata.mod.items()]}
    where = r"mdata\.obs" if place == "mdata" else r"mdata\['rna'\]\.obs"
    with pytest.raises(
        ValueError, match=rf"batch_key='batch': {where}\['batch'\] has 2 missing value\(s\) \(NaN\), in "
    ):
        schce.HCEClassifier.setup_mudata(mdata, LABELS, rna_layer="counts", batch_key="batch", modalities=modalities)
    for name, data in [("mdata", mdata), *mdata.mod.items()]:
        pd.testing.assert_frame_equal(data.obs, obs[name])
    assert "_scvi_manager_uuid" not in mdata.uns


@pytest.mark.parametrize(("place", "column"), [("rna", "_scvi_labels"), ("mdata", "_scvi_batch")])
def test_a_users_scvi_named_column_in_a_mudata_is_not_overwritten(pbmc, place, column):
    mdata = _mudata(pbmc)
    obs = mdata.obs if place == "mdata" else mdata["rna"].obs
    obs[column] = "mine"
    where = r"mdata\.obs" if place == "mdata" else r"mdata\['rna'\]\.obs"
    with pytest.raises(ValueError, match=rf"{where} has column\(s\) \['{column}'\], which scvi-tools' set-up would"):
        schce.HCEClassifier.setup_mudata(
            mdata, LABELS, rna_layer="counts", modalities={"rna_layer": "rna", "labels_key": "rna"}
        )
    assert (obs[column] == "mine").all()
    assert not [c for c in mdata.obs.columns if c.startswith("_scvi") and c != column]
    obs.rename(columns={column: "mine"}, inplace=True)  # the fix the message names
    schce.HCEClassifier.setup_mudata(
        mdata, LABELS, rna_layer="counts", modalities={"rna_layer": "rna", "labels_key": "rna"}
    )
    assert (obs["mine"] == "mine").all()
    # a set-up scvi-tools did itself is replaced as scvi-tools does
    schce.HCEClassifier.setup_mudata(
        mdata, LABELS, rna_layer="counts", modalities={"rna_layer": "rna", "labels_key": "rna"}
    )


def test_a_failed_mudata_registration_leaves_every_obs_as_it_was(pbmc, monkeypatch):
    """scvi-tools writes _scvi_labels, then fails on the batch field: both obs are restored."""
    from scvi.data.fields import MuDataCategoricalObsField

    original = MuDataCategoricalObsField.register_field

    def failing(self, mdata):
        out = original(self, mdata)
        if self.registry_key == "batch":
            raise RuntimeError("registration failed after writing")
        return out

    monkeypatch.setattr(MuDataCategoricalObsField, "register_field", failing)
    mdata = _mudata(pbmc)
    obs = {name: data.obs.copy() for name, data in [("mdata", mdata), *mdata.mod.items()]}
    with pytest.raises(RuntimeError, match="registration failed after writing"):
        schce.HCEClassifier.setup_mudata(
            mdata, LABELS, rna_layer="counts", modalities={"rna_layer": "rna", "labels_key": "rna"}
        )
    for name, data in [("mdata", mdata), *mdata.mod.items()]:
        pd.testing.assert_frame_equal(data.obs, obs[name])


def test_predict_never_overwrites_a_users_column_in_mdata_obs(pbmc, mudata_model):
    """The copies pulled into mdata.obs follow the rule of the modality's own keys (issue 24)."""
    query = _mudata(pbmc)
    query.obs["rna:schce_prediction"] = "mine"
    with pytest.raises(ValueError, match=r"mdata already holds obs\['rna:schce_prediction'\], which schce did not"):
        mudata_model.predict(query, layer="counts")
    assert (query.obs["rna:schce_prediction"] == "mine").all()
    assert "schce_prediction" not in query["rna"].obs  # refused before any work
    mudata_model.predict(query, layer="counts", overwrite=True)
    assert (query.obs["rna:schce_prediction"].astype(str) == query["rna"].obs["schce_prediction"].astype(str)).all()


def test_predict_reruns_replace_the_pulled_copies(pbmc, mudata_model):
    query = _mudata(pbmc)
    query["rna"].obs["cluster"] = pd.Categorical(pbmc.obs["bulk_labels"].astype(str).str[:6])
    mudata_model.predict(query, layer="counts", majority_voting=True, over_clustering="cluster")
    assert "rna:schce_majority_voting" in query.obs
    mudata_model.predict(query, layer="counts", coarse_threshold=0.9)  # schce's own copies: replaced, none stale
    assert "rna:schce_majority_voting" not in query.obs and "schce_majority_voting" not in query["rna"].obs
    pulled = query.obs["rna:schce_prediction_coarse"].astype(str)
    assert (pulled == query["rna"].obs["schce_prediction_coarse"].astype(str)).all()
