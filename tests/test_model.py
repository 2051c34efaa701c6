from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import SMALL_MLP, assert_unchanged, snapshot

import schce
from schce.ontology import load_cell_ontology

CONTRACT_OBS = [
    "schce_prediction",
    "schce_prediction_ontology_term_id",
    "schce_confidence",
    "schce_prediction_coarse",
    "schce_prediction_coarse_ontology_term_id",
    "schce_unassigned_reason",
]


def _query(pbmc):
    """The PBMC cells without labels, as a user's query would be."""
    q = pbmc.copy()
    q.obs = q.obs[["phase"]].copy()
    return q


def test_setup_maps_names_to_cl_ids(pbmc_copy):
    adata = pbmc_copy
    adata.obs["names"] = adata.obs["cell_type"].astype(str)
    schce.HCEClassifier.setup_anndata(adata, labels_key="names")
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    assert model.hierarchy.labels == tuple(sorted(adata.obs["cell_type_ontology_term_id"].unique()))
    assert "CL:0000084" in model.hierarchy.terms  # T cell, an ancestor of the T-cell labels
    assert model.hierarchy.name("CL:0000236") == "B cell"
    codes = model._label_codes()
    expected = model.hierarchy.label_index(adata.obs["cell_type_ontology_term_id"].astype(str))
    np.testing.assert_array_equal(codes, expected)
    assert "10 labels" in repr(model) and "Not Trained" in repr(model)


def test_unused_categories_in_the_labels_column_are_ignored(pbmc_copy):
    adata = pbmc_copy
    adata.obs["labels"] = adata.obs["cell_type"].cat.add_categories(["not a cell type at all"])
    schce.HCEClassifier.setup_anndata(adata, labels_key="labels")
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    assert model.hierarchy.n_labels == 10 and (model._label_codes() >= 0).all()


def test_train_history_and_split(trained):
    h = trained.history
    assert {"train_loss", "validation_loss", "validation_corrected_macro_f1", "validation_macro_f1"} <= set(h)
    assert len(h["train_loss"]) == 4 and h["train_loss"].index.name == "epoch"
    assert np.isfinite(h["train_loss"].iloc[:, 0]).all()
    n = trained.adata.n_obs
    assert len(trained.train_indices) + len(trained.validation_indices) == n
    assert not set(trained.train_indices) & set(trained.validation_indices)
    assert trained.is_trained


def test_training_is_deterministic_with_seed(pbmc_copy):
    adata = pbmc_copy
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    states = []
    for seed in (3, 3, 4):
        model = schce.HCEClassifier(adata, **SMALL_MLP)
        model.train(max_epochs=2, seed=seed, enable_progress_bar=False)
        states.append(model.module.state_dict())
    # Bitwise is the point here: the same seed, the same computation, one machine, one process.
    for k in states[0]:
        torch.testing.assert_close(
            states[0][k], states[1][k], rtol=0, atol=0, msg=f"{k} differs between two seed-3 runs"
        )
    assert any(bool((states[0][k] != states[2][k]).any()) for k in states[0] if states[0][k].is_floating_point())


def test_training_on_backed_data_equals_in_memory(pbmc, tmp_path):
    path = tmp_path / "ref.h5ad"
    pbmc.write_h5ad(path)
    states = []
    for adata in (ad.read_h5ad(path, backed="r"), pbmc.copy()):
        schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
        model = schce.HCEClassifier(adata, **SMALL_MLP)
        model.train(max_epochs=2, seed=1, enable_progress_bar=False)
        states.append(model.module.state_dict())
    # The same values reach the model on both paths; memory layout may change a kernel's rounding, hence a tolerance.
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-5, atol=1e-6, msg=f"{k} differs")


def test_predict_writes_the_output_contract(trained, pbmc):
    query = _query(pbmc)
    query.layers["counts"] = query.X.copy()
    before = snapshot(query)
    df = trained.predict(query)
    h = trained.hierarchy

    assert list(df.columns) == CONTRACT_OBS
    pd.testing.assert_frame_equal(query.obs[CONTRACT_OBS], df)
    probs = query.obsm["schce_probabilities"]
    assert isinstance(probs, pd.DataFrame) and list(probs.columns) == list(h.labels)
    assert (probs.index == query.obs_names).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    ids = df["schce_prediction_ontology_term_id"].astype(str).to_numpy()
    np.testing.assert_array_equal(ids, np.asarray(h.labels)[probs.to_numpy().argmax(1)])
    np.testing.assert_allclose(df["schce_confidence"], probs.to_numpy().max(1), rtol=1e-6)
    onto = load_cell_ontology()
    assert (df["schce_prediction"].astype(str).to_numpy() == np.array([onto.name(i) for i in ids])).all()
    assert isinstance(df["schce_prediction"].dtype, pd.CategoricalDtype)

    scores = query.obsm["schce_hierarchical_scores"]
    assert list(scores.columns) == list(h.terms)
    # label columns: own probability plus descendant labels' probabilities
    np.testing.assert_allclose(scores[list(h.labels)].to_numpy(), probs.to_numpy() @ h.R.T, atol=1e-5)
    np.testing.assert_allclose(scores["CL:0000000"], 1.0, atol=1e-5)  # the root holds everything
    t_cells = [j for j, lab in enumerate(h.labels) if "CL:0000084" in h.ancestors(lab)]
    np.testing.assert_allclose(scores["CL:0000084"], probs.to_numpy()[:, t_cells].sum(1), atol=1e-5)

    coarse = df["schce_prediction_coarse_ontology_term_id"].astype(str).to_numpy()
    coarse_score = scores.to_numpy()[np.arange(len(coarse)), [h.terms.index(c) for c in coarse]]
    assert (coarse_score >= 0.5 - 1e-6).all()
    # the back-off is never shallower than needed: no deeper term reaches the threshold
    depth = dict(zip(h.terms, h.depth, strict=True))
    deeper = scores.to_numpy() >= 0.5
    max_depth = np.where(deeper, h.depth[None, :], -1).max(1)
    np.testing.assert_array_equal([depth[c] for c in coarse], max_depth)
    confident = df["schce_confidence"].to_numpy() >= 0.5
    np.testing.assert_array_equal(coarse[confident], ids[confident])

    assert query.obsm["X_schce"].shape == (query.n_obs, trained.module.n_latent)
    uns = query.uns["schce"]
    assert uns["ontology_version"] == "2026-03-26" and uns["coarse_threshold"] == 0.5
    assert uns["gene_overlap"] == {"n_model_genes": 765, "n_found": 765, "fraction": 1.0}
    # nothing the user had changed
    np.testing.assert_array_equal(query.X.toarray(), before["X"])
    pd.testing.assert_frame_equal(query.obs[["phase"]], before["obs"])
    assert set(query.layers) == {"counts"}


def test_predict_overwrite_is_logged_and_inplace_false_writes_nothing(trained, pbmc, caplog):
    query = _query(pbmc)
    trained.predict(query)
    with caplog.at_level(logging.INFO, logger="schce"):
        trained.predict(query)
    assert "Overwriting earlier schce outputs" in caplog.text
    fresh = _query(pbmc)
    before = snapshot(fresh)
    df = trained.predict(fresh, inplace=False)
    assert_unchanged(fresh, before)
    pd.testing.assert_frame_equal(df, query.obs[CONTRACT_OBS])


def test_key_added_and_threshold(trained, pbmc):
    query = _query(pbmc)
    trained.predict(query, key_added="ct", coarse_threshold=0.95)
    assert "ct_prediction" in query.obs and "X_ct" in query.obsm and "ct" in query.uns
    strict = query.obs["ct_prediction_coarse_ontology_term_id"].astype(str)
    trained.predict(query, key_added="ct2", coarse_threshold=0.3)
    loose = query.obs["ct2_prediction_coarse_ontology_term_id"].astype(str)
    h = trained.hierarchy
    # a higher threshold can only back off to the same term or an ancestor of it
    assert all(s == l_ or s in h.ancestors(l_) for s, l_ in zip(strict, loose, strict=True))
    assert (strict != loose).any()
    with pytest.raises(ValueError, match="coarse_threshold"):
        trained.predict(query, coarse_threshold=0)


def test_dense_csr_backed_and_lognorm_agree(trained, pbmc, tmp_path):
    csr = _query(pbmc)
    ref = trained.predict(csr, inplace=False)
    ref_probs = trained.get_latent_representation(csr)

    dense = _query(pbmc)
    dense.X = dense.X.toarray()
    path = tmp_path / "q.h5ad"
    csr.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    lognorm = _query(pbmc)
    import scanpy as sc

    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    for q in (dense, backed, lognorm):
        df = trained.predict(q)
        pd.testing.assert_series_equal(
            df["schce_prediction_ontology_term_id"], ref["schce_prediction_ontology_term_id"], check_names=False
        )
        np.testing.assert_allclose(df["schce_confidence"], ref["schce_confidence"], atol=1e-5)
    np.testing.assert_allclose(trained.get_latent_representation(lognorm), ref_probs, atol=1e-4)
    assert backed.uns["schce"]["normalized"] is True and lognorm.uns["schce"]["normalized"] is False


def test_gene_alignment_reorders_zero_fills_and_strips_versions(trained, pbmc, caplog):
    full = _query(pbmc)
    ref = trained.get_latent_representation(full)
    rng = np.random.default_rng(0)
    keep = rng.permutation(full.n_vars)[: int(0.8 * full.n_vars)]
    sub = full[:, keep].copy()
    # expected: the same cells with the dropped genes set to zero
    zeroed = full.copy()
    dropped = np.setdiff1d(np.arange(full.n_vars), keep)
    X = zeroed.X.toarray()
    X[:, dropped] = 0
    zeroed.X = sp.csr_matrix(X)
    np.testing.assert_allclose(trained.get_latent_representation(sub), trained.get_latent_representation(zeroed), 1e-5)
    assert not np.allclose(trained.get_latent_representation(sub), ref, atol=1e-3)
    trained.predict(sub)
    assert sub.uns["schce"]["gene_overlap"]["n_found"] == len(keep)

    # symbols in a var column, var_names something else
    by_col = full.copy()
    by_col.var["symbol"] = by_col.var_names.to_numpy()
    by_col.var_names = [f"gene{i}" for i in range(by_col.n_vars)]
    np.testing.assert_allclose(trained.get_latent_representation(by_col, gene_symbols="symbol"), ref, atol=1e-6)

    # low overlap warns
    low = full[:, keep[: full.n_vars // 4]].copy()
    with caplog.at_level(logging.WARNING, logger="schce"):
        trained.predict(low)
    assert "below 50%" in caplog.text


def test_ensembl_version_suffixes_are_stripped():
    from schce.data import GeneAligner, strip_ensembl_version

    assert list(strip_ensembl_version(["ENSG00000141510.17", "CD3E", "ENSMUSG00000000001.4"])) == [
        "ENSG00000141510",
        "CD3E",
        "ENSMUSG00000000001",
    ]
    al = GeneAligner(["ENSG00000000003", "ENSG00000000005", "ENSG00000000419"], ["ENSG00000000419.12", "X"])
    assert al.index.tolist() == [-1, -1, 0] and al.n_found == 1
    block = np.array([[5.0, 7.0]], dtype=np.float32)
    np.testing.assert_array_equal(al.transform(block), [[0.0, 0.0, 5.0]])


def test_save_load_round_trip_and_atomic_overwrite(trained, pbmc, tmp_path):
    path = tmp_path / "model"
    trained.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["model.pt", "schce.json"]
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(path)
    loaded = schce.HCEClassifier.load(path)
    assert loaded.hierarchy.labels == trained.hierarchy.labels and loaded.is_trained
    pd.testing.assert_frame_equal(loaded.history["train_loss"], trained.history["train_loss"])
    np.testing.assert_array_equal(loaded.train_indices, trained.train_indices)
    a, b = _query(pbmc), _query(pbmc)
    trained.predict(a)
    loaded.predict(b)
    np.testing.assert_allclose(
        a.obsm["schce_probabilities"].to_numpy(), b.obsm["schce_probabilities"].to_numpy(), rtol=1e-5, atol=1e-7
    )
    pd.testing.assert_frame_equal(a.obs, b.obs)
    trained.save(path, overwrite=True, save_anndata=True)
    assert (path / "adata.h5ad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]  # no temporary leftovers
    assert "Trained" in repr(loaded)
    loaded.view_anndata_setup()


def test_linear_backbone_ce_and_reference_form(pbmc_copy):
    adata = pbmc_copy
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    for kwargs in ({"backbone": "linear", "loss": "ce"}, {"hce_form": "reference", **SMALL_MLP}):
        model = schce.HCEClassifier(adata, **kwargs)
        model.train(max_epochs=2, seed=0, enable_progress_bar=False)
        df = model.predict(adata, key_added="x")
        assert df["x_confidence"].between(0, 1).all()
    emb = model.get_latent_representation(adata)
    assert emb.shape == (adata.n_obs, SMALL_MLP["n_hidden"])
    lin = schce.HCEClassifier(adata, backbone="linear")
    assert lin.module.n_latent == lin.hierarchy.n_labels
    with pytest.raises(ValueError, match="Unknown backbone"):
        schce.HCEClassifier(adata, backbone="transformer")
    with pytest.raises(ValueError, match="loss"):
        schce.HCEClassifier(adata, loss="focal")


def test_normalisation_is_inside_the_module():
    from schce.nn import normalize_counts

    x = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    out = normalize_counts(x)
    np.testing.assert_allclose(out[0].numpy(), np.log1p(np.array([2500.0, 7500.0, 0.0])), rtol=1e-6)
    assert (out[1] == 0).all()  # an empty cell stays exactly zero, no NaN
