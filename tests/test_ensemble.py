"""The seed ensemble HCEEnsemble: the mean of independently trained members, HCEClassifier's outputs, files."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_MLP

import schce

LABELS = "cell_type_ontology_term_id"
TREG = "CL:0000815"  # left out of the fine-tuning fixture's training, so fine_tune meets it as a new label
TRAIN = {"max_epochs": 2, "enable_progress_bar": False}
SEED = 7
N = 3


def _registered(pbmc):
    adata = pbmc.copy()
    schce.HCEEnsemble.setup_anndata(adata, labels_key=LABELS)
    return adata


@pytest.fixture(scope="module")
def ensemble(pbmc):
    ens = schce.HCEEnsemble(_registered(pbmc), n_members=N, **SMALL_MLP)
    ens.train(seed=SEED, **TRAIN)
    return ens


@pytest.fixture(scope="module")
def singles(pbmc):
    """The published scheme computed independently: N HCEClassifiers on their own copy, seeds SEED + 1000 * i."""
    models = []
    for i in range(N):
        adata = pbmc.copy()
        schce.HCEClassifier.setup_anndata(adata, labels_key=LABELS)
        model = schce.HCEClassifier(adata, **SMALL_MLP)
        model.train(seed=SEED + 1000 * i, **TRAIN)
        models.append(model)
    return models


def _probabilities(model, query, **kwargs) -> pd.DataFrame:
    out = query.copy()
    model.predict(out, **kwargs)
    return out.obsm["schce_probabilities"]


@pytest.mark.parametrize("calibrated", [True, False])
def test_probabilities_are_the_mean_of_independent_models(ensemble, singles, pbmc, calibrated):
    assert ensemble.seeds_ == [SEED, SEED + 1000, SEED + 2000]
    for member, single in zip(ensemble.members, singles, strict=True):
        np.testing.assert_allclose(member.temperature_, single.temperature_, rtol=1e-6)
    expected = sum(_probabilities(m, pbmc, calibrated=calibrated).to_numpy() for m in singles) / N
    got = _probabilities(ensemble, pbmc, calibrated=calibrated)
    assert list(got.columns) == list(ensemble.hierarchy.labels)
    np.testing.assert_allclose(got.to_numpy(), expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.to_numpy().sum(axis=1), 1.0, atol=1e-6)  # stored as float32
    # The members disagree somewhere, so the mean is not any one member's.
    assert np.abs(_probabilities(singles[0], pbmc, calibrated=calibrated).to_numpy() - expected).max() > 1e-3


def test_predict_writes_the_classifiers_outputs_from_the_mean(ensemble, singles, pbmc):
    single_out, out = pbmc.copy(), pbmc.copy()
    singles[0].predict(single_out)
    obs = ensemble.predict(out)
    assert list(obs.columns) == [c for c in single_out.obs.columns if c.startswith("schce_")]
    assert set(out.obsm) == set(single_out.obsm)
    probs = out.obsm["schce_probabilities"]
    argmax = probs.columns.to_numpy()[probs.to_numpy().argmax(axis=1)]
    np.testing.assert_array_equal(obs["schce_prediction_ontology_term_id"].astype(str).to_numpy(), argmax)
    np.testing.assert_allclose(obs["schce_confidence"].to_numpy(), probs.to_numpy().max(axis=1), rtol=1e-6)
    # Subtree scores of the mean probabilities; the coarse call is a term whose subtree holds >= 0.5.
    h = ensemble.hierarchy
    scores = out.obsm["schce_hierarchical_scores"]
    for term in ("CL:0000084", TREG):  # T cell (an ancestor), regulatory T cell (a label)
        below = [label for label in h.labels if label == term or term in h.ancestors(label)]
        np.testing.assert_allclose(scores[term].to_numpy(), probs[below].to_numpy().sum(axis=1), rtol=1e-5)
    coarse = obs["schce_prediction_coarse_ontology_term_id"].astype(str).to_numpy()
    held = scores.to_numpy()[np.arange(len(coarse)), scores.columns.get_indexer(coarse)]
    assert (held >= 0.5 - 1e-6).all()
    # The embedding: the members' side by side, as get_latent_representation returns it.
    latent = ensemble.get_latent_representation(pbmc)
    assert latent.shape == (pbmc.n_obs, N * SMALL_MLP["n_hidden"])
    np.testing.assert_allclose(out.obsm["X_schce"], latent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(latent[:, 32:64], singles[1].get_latent_representation(pbmc), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ensemble.get_latent_representation(pbmc, member=2), latent[:, 64:], rtol=1e-5)
    uns = out.uns["schce"]
    assert uns["model"] == "HCEEnsemble" and uns["n_members"] == N
    np.testing.assert_array_equal(uns["seeds"], [SEED, SEED + 1000, SEED + 2000])
    np.testing.assert_allclose(uns["temperature"], [m.temperature_ for m in singles], rtol=1e-6)


def test_min_confidence_and_majority_voting_apply_to_the_mean(ensemble, pbmc):
    out = pbmc.copy()
    obs = ensemble.predict(out, min_confidence=0.9, majority_voting=True, key_added="ens")
    confidence = out.obsm["ens_probabilities"].to_numpy().max(axis=1)
    low = confidence < 0.9
    assert 0 < low.sum() < len(low)
    assert (obs.loc[low, "ens_prediction"].astype(str) == "unassigned").all()
    assert (obs.loc[~low, "ens_prediction"].astype(str) != "unassigned").all()
    assert {"ens_majority_voting", "ens_majority_voting_ontology_term_id", "ens_over_clustering"} <= set(obs.columns)
    with pytest.raises(ValueError, match="overwrite"):  # the foreign-key rule is the classifier's
        out.obs["ens2_prediction"] = "mine"
        ensemble.predict(out, key_added="ens2")


def test_evaluate_scores_the_mean(ensemble, pbmc):
    out = pbmc.copy()
    obs = ensemble.predict(out)
    result = ensemble.evaluate(pbmc, labels_key=LABELS)
    pred = obs["schce_prediction_ontology_term_id"].astype(str).to_numpy()
    exact = float(np.mean(pred == pbmc.obs[LABELS].astype(str).to_numpy()))
    np.testing.assert_allclose(result.overall.loc["accuracy", "value"], exact, rtol=1e-9)


def test_one_member_is_the_single_model(singles, pbmc):
    ens = schce.HCEEnsemble(_registered(pbmc), n_members=1, **SMALL_MLP)
    ens.train(seed=SEED, **TRAIN)
    got, want = pbmc.copy(), pbmc.copy()
    ens.predict(got)
    singles[0].predict(want)
    cols = ["schce_prediction_ontology_term_id", "schce_prediction_coarse_ontology_term_id"]
    pd.testing.assert_frame_equal(got.obs[cols].astype(str), want.obs[cols].astype(str))
    np.testing.assert_allclose(got.obs["schce_confidence"], want.obs["schce_confidence"], rtol=1e-6)
    np.testing.assert_allclose(got.obsm["schce_probabilities"], want.obsm["schce_probabilities"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.obsm["X_schce"], want.obsm["X_schce"], rtol=1e-5, atol=1e-6)


def test_training_is_deterministic_and_logs_each_member(ensemble, pbmc, caplog):
    again = schce.HCEEnsemble(_registered(pbmc), n_members=N, **SMALL_MLP)
    assert not again.is_trained and "not trained" in repr(again)
    with pytest.raises(RuntimeError, match="not trained"):
        again.predict(pbmc.copy())
    with caplog.at_level(logging.INFO, logger="schce"):
        again.train(seed=SEED, **TRAIN)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training member")]
    assert lines == [f"Training member {i + 1}/{N} (seed {SEED + 1000 * i})." for i in range(N)]
    np.testing.assert_allclose(_probabilities(again, pbmc), _probabilities(ensemble, pbmc), rtol=1e-6, atol=1e-9)
    assert again.is_trained and len(again.history) == N
    assert all("validation_corrected_macro_f1" in h for h in again.history)
    assert repr(again).startswith(f"HCEEnsemble of {N} members (trained, seeds [{SEED}, ")


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3", None])
def test_bad_n_members_is_refused_before_any_work(pbmc, bad):
    with pytest.raises(ValueError, match="n_members must be an integer of at least 1"):
        schce.HCEEnsemble(_registered(pbmc), n_members=bad)


def test_bad_arguments_are_refused(ensemble, pbmc):
    with pytest.raises(ValueError, match="HCEEnsemble.load"):
        schce.HCEEnsemble(None)
    with pytest.raises(ValueError, match="member must be None or a member index"):
        ensemble.get_latent_representation(pbmc, member=N)
    with pytest.raises(ValueError, match="ckpt_path='last'"):
        schce.HCEEnsemble(_registered(pbmc), n_members=2).train(ckpt_path="some.ckpt")


def test_save_load_round_trip(ensemble, pbmc, tmp_path):
    path = tmp_path / "ens"
    ensemble.save(path)
    manifest = json.loads((path / "schce-ensemble.json").read_text())
    assert manifest["format"] == "schce-ensemble" and manifest["n_members"] == N
    assert manifest["seeds"] == [SEED, SEED + 1000, SEED + 2000]
    loaded = schce.HCEEnsemble.load(path, accelerator="cpu")
    assert loaded.seeds_ == ensemble.seeds_ and loaded.n_members == N
    got, want = pbmc.copy(), pbmc.copy()
    loaded.predict(got)
    ensemble.predict(want)
    pd.testing.assert_frame_equal(got.obs, want.obs, check_exact=False, rtol=1e-6)
    np.testing.assert_allclose(got.obsm["schce_probabilities"], want.obsm["schce_probabilities"], rtol=1e-6)
    # A member is a classifier directory of its own.
    member = schce.HCEClassifier.load(path / "member-1", accelerator="cpu")
    np.testing.assert_allclose(_probabilities(member, pbmc), _probabilities(ensemble.members[1], pbmc), rtol=1e-6)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ensemble.save(path)
    ensemble.save(path, overwrite=True)
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        ensemble.save(path, overwrite=True)
    assert (path / "notes.txt").read_text() == "mine"
    (path / "notes.txt").unlink()
    (path / "member-0" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="member-0"):
        ensemble.save(path, overwrite=True)
    assert (path / "member-0" / "notes.txt").read_text() == "mine"


def test_files_are_checked_on_load(ensemble, tmp_path):
    path = tmp_path / "ens"
    ensemble.save(path)
    with pytest.raises(ValueError, match=r"holds an HCEEnsemble.*schce.HCEEnsemble.load"):
        schce.HCEClassifier.load(path)
    with pytest.raises(ValueError, match=r"holds one HCEClassifier.*schce.HCEClassifier.load"):
        schce.HCEEnsemble.load(path / "member-0")
    with pytest.raises(ValueError, match="not a schce ensemble directory"):
        schce.HCEEnsemble.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        schce.HCEEnsemble.load(tmp_path / "absent")
    manifest_file = path / "schce-ensemble.json"
    manifest = json.loads(manifest_file.read_text())
    # a member replaced by another model's files
    other = tmp_path / "other"
    ensemble.members[0].save(other)
    (path / "member-2" / "schce.json").write_text((other / "schce.json").read_text())
    with pytest.raises(ValueError, match=r"member-2/schce.json does not match the checksum"):
        schce.HCEEnsemble.load(path)
    ensemble.save(path, overwrite=True)
    for field, value, match in (
        ("n_members", 2, "members must be"),
        ("n_members", 0, "n_members must be a positive integer"),
        ("seeds", [1, 2], "seeds must be"),
        ("model_class", "HCEClassifier", "not a HCEEnsemble"),
        ("format_version", 99, "newer schce"),
    ):
        manifest_file.write_text(json.dumps({**manifest, field: value}))
        with pytest.raises(ValueError, match=match):
            schce.HCEEnsemble.load(path)
    manifest_file.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        schce.HCEEnsemble.load(path)
    manifest_file.write_text(json.dumps(manifest))
    for name in ("schce.json", "model.pt"):
        (path / "member-1" / name).unlink()
    with pytest.raises(ValueError, match="member-1 is missing"):
        schce.HCEEnsemble.load(path)


@pytest.fixture(scope="module")
def without_treg(pbmc, tmp_path_factory):
    train = pbmc[pbmc.obs[LABELS] != TREG].copy()
    schce.HCEEnsemble.setup_anndata(train, labels_key=LABELS)
    ens = schce.HCEEnsemble(train, n_members=2, **SMALL_MLP)
    ens.train(seed=0, **TRAIN)
    path = tmp_path_factory.mktemp("ensemble") / "no_treg"
    ens.save(path)
    return path


def test_fine_tune_fine_tunes_every_member_with_its_seed(without_treg, pbmc):
    ens = schce.HCEEnsemble.load(without_treg, accelerator="cpu")
    added = ens.fine_tune(pbmc, LABELS, max_epochs=1, seed=3, enable_progress_bar=False)
    assert added == [TREG]
    assert all(TREG in m.hierarchy.labels for m in ens.members)
    # member 1 is its saved self fine-tuned with seed 3 + 1000
    single = schce.HCEClassifier.load(without_treg / "member-1", accelerator="cpu")
    single.fine_tune(pbmc, LABELS, max_epochs=1, seed=1003, enable_progress_bar=False)
    np.testing.assert_allclose(_probabilities(ens.members[1], pbmc), _probabilities(single, pbmc), rtol=1e-6)
    assert TREG in _probabilities(ens, pbmc).columns


def test_a_failed_fine_tune_leaves_every_member_as_it_was(without_treg, pbmc, monkeypatch):
    ens = schce.HCEEnsemble.load(without_treg, accelerator="cpu")
    before = [(m.module, m.hierarchy.labels, m.temperature_, m.setup_state.hierarchy) for m in ens.members]

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ens.members[1], "fine_tune", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        ens.fine_tune(pbmc, LABELS, max_epochs=1, enable_progress_bar=False)
    after = [(m.module, m.hierarchy.labels, m.temperature_, m.setup_state.hierarchy) for m in ens.members]
    for (module, labels, t, h), (module2, labels2, t2, h2) in zip(before, after, strict=True):
        assert module is module2 and labels == labels2 and t == t2 and h == h2
    assert TREG not in ens.hierarchy.labels


def test_from_members_checks_the_models_and_evaluates_a_store(tmp_path):
    from schce.data import SCTabStoreDataModule, read_sctab_store, write_sctab_store

    atlas = schce.datasets.simulate_atlas(900, n_genes=150, n_cell_types=6, library_size=300, seed=1, progress=False)
    path = write_sctab_store(atlas, tmp_path / "store", split_key="donor_id")
    dm = SCTabStoreDataModule(path, batch_size=128, num_workers=0, seed=0)
    models = []
    for seed in (0, 1000):
        model = schce.HCEClassifier.from_sctab_store(path, **SMALL_MLP)
        model.train(datamodule=dm, max_epochs=1, seed=seed, enable_progress_bar=False)
        models.append(model)
    ens = schce.HCEEnsemble.from_members(models, seeds=[0, 1000])
    assert ens.members == models and ens.seeds_ == [0, 1000]
    result = ens.evaluate(datamodule=dm)
    test = read_sctab_store(path, "test")
    mean = sum(_probabilities(m, test).to_numpy() for m in models) / 2
    expected = np.asarray(ens.hierarchy.labels)[mean.argmax(axis=1)]
    detailed = result.detailed.set_index(result.detailed.index.astype(str)).loc[test.obs_names]
    np.testing.assert_array_equal(detailed["predicted"].astype(str).to_numpy(), expected)
    assert result.overall.loc["n_cells", "value"] == dm.n_cells("test")
    # the same ensemble built and trained in one go on the store (a fresh module, as the members above had): the
    # same members, seed for seed
    direct = schce.HCEEnsemble.from_sctab_store(path, n_members=2, **SMALL_MLP)
    assert not direct.is_trained
    fresh = SCTabStoreDataModule(path, batch_size=128, num_workers=0, seed=0)
    direct.train(datamodule=fresh, max_epochs=1, seed=0, enable_progress_bar=False)
    assert direct.seeds_ == [0, 1000]
    for member, model in zip(direct.members, models, strict=True):
        np.testing.assert_allclose(_probabilities(member, test), _probabilities(model, test), atol=1e-5)
    with pytest.raises(ValueError, match="n_members must be an integer of at least 1"):
        schce.HCEEnsemble.from_sctab_store(path, n_members=0)
    with pytest.raises(TypeError, match="non-empty list of HCEClassifier"):
        schce.HCEEnsemble.from_members([])
    with pytest.raises(ValueError, match="seeds must be None or 2 integers"):
        schce.HCEEnsemble.from_members(models, seeds=[0])


def test_members_of_different_models_are_refused(ensemble, without_treg, tmp_path):
    other = schce.HCEEnsemble.load(without_treg, accelerator="cpu")
    with pytest.raises(ValueError, match="Model 1 differs from model 0 in its labels"):
        schce.HCEEnsemble.from_members([ensemble.members[0], other.members[0]])
    # a saved ensemble whose member was swapped for another model's, checksum and all
    path = tmp_path / "ens"
    ensemble.save(path)
    manifest = json.loads((path / "schce-ensemble.json").read_text())
    shutil.rmtree(path / "member-1")
    shutil.copytree(without_treg / "member-0", path / "member-1")
    manifest["checksums"]["member-1"] = json.loads((without_treg / "schce-ensemble.json").read_text())["checksums"][
        "member-0"
    ]
    (path / "schce-ensemble.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="come from different models.*labels"):
        schce.HCEEnsemble.load(path)


def test_checkpoints_go_to_one_directory_per_member_and_setup_is_shown(pbmc, tmp_path, capsys):
    ens = schce.HCEEnsemble(_registered(pbmc), n_members=2, **SMALL_MLP)
    ens.train(seed=0, max_epochs=1, enable_progress_bar=False, checkpoint_dir=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["member-0", "member-1"]
    for name in ("member-0", "member-1"):
        assert {"best.ckpt", "last.ckpt"} <= {p.name for p in (tmp_path / "ckpt" / name).iterdir()}
    ens.view_anndata_setup()
    shown = capsys.readouterr().out
    assert LABELS in shown
