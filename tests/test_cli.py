"""The ``schce train / predict / evaluate`` commands on a small h5ad file, and their one-line errors."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _private import DEFAULT_BACKBONE_KWARGS
from click.testing import CliRunner
from conftest import SMALL_MLP

import schce
from schce.cli import cli

LABELS = "cell_type_ontology_term_id"
SMALL = ["--n-hidden", str(SMALL_MLP["n_hidden"]), "--n-layers", str(SMALL_MLP["n_layers"])]
OBS_CONTRACT = [
    "schce_prediction",
    "schce_prediction_ontology_term_id",
    "schce_confidence",
    "schce_prediction_coarse",
    "schce_prediction_coarse_ontology_term_id",
]


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_error_line(result) -> str:
    """The result failed with exactly one ``Error:`` line and no traceback; returns that line."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, pbmc):
    """A 420-cell subset of pbmc68k written to h5ad, and a model trained on it by ``schce train``."""
    root = tmp_path_factory.mktemp("cli")
    adata = pbmc[np.random.default_rng(0).permutation(pbmc.n_obs)[:420]].copy()
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3 == 0, "d1", "d2")
    h5ad = root / "small.h5ad"
    adata.write_h5ad(h5ad)
    model_dir = root / "model"
    result = _run("train", h5ad, "--labels-key", LABELS, "--out", model_dir, "--max-epochs", 3, "--seed", 0,
                  "--no-progress", *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "h5ad": h5ad, "model": model_dir, "adata": adata, "train_output": result.output}


def test_train_writes_a_loadable_model_and_reports_the_validation_metric(files):
    assert "validation hierarchy-corrected macro F1 = " in files["train_output"]
    score = float(files["train_output"].split("macro F1 = ")[1].split()[0])
    assert 0 <= score <= 1
    assert (files["model"] / "model.pt").is_file() and (files["model"] / "schce.json").is_file()
    model = schce.HCEClassifier.load(files["model"])
    assert model.loss == "hce-aware" and model.backbone == "mlp" and model.is_trained_
    # the full architecture is saved: the package defaults with the given settings on top
    assert model.init_params_["kwargs"]["backbone_kwargs"] == {**DEFAULT_BACKBONE_KWARGS["mlp"], **SMALL_MLP}
    assert model.hierarchy.n_labels == files["adata"].obs[LABELS].nunique()
    assert model.genes == list(files["adata"].var_names)
    # the model's own validation score for its kept epoch (lowest class-weighted validation loss) is what it printed
    assert model.best_epoch_ == int(model.history_["validation_weighted_loss"].iloc[:, 0].idxmin())
    best = model.history_["validation_corrected_macro_f1"].iloc[:, 0].loc[model.best_epoch_]
    assert score == pytest.approx(best, abs=1e-4)


def test_train_refuses_existing_out_and_honours_loss_backbone_and_split(files):
    result = _run("train", files["h5ad"], "--labels-key", LABELS, "--out", files["model"], "--max-epochs", 1)
    line = _one_error_line(result)
    assert "already exists" in line and "--overwrite" in line
    out = files["root"] / "linear_ce"
    result = _run("train", files["h5ad"], "--labels-key", "cell_type", "--out", out, "--backbone", "linear",
                  "--loss", "ce", "--max-epochs", 2, "--split-key", "donor", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Converged at epoch" in result.output
    model = schce.HCEClassifier.load(out)
    assert (model.loss, model.backbone, model.optimizer_) == ("ce", "linear", "lbfgs")
    donors = files["adata"].obs["donor"].to_numpy()
    # whole donors go to training or validation
    assert set(donors[model.train_indices_]).isdisjoint(donors[model.validation_indices_])


def test_loss_choices_come_from_the_model():
    import typing

    from schce.train import LOSSES

    choices = next(p for p in cli.commands["train"].params if p.name == "loss").type.choices
    # loss: Literal[...] | None (None: the recipe's or the package's default)
    hint = typing.get_type_hints(schce.HCEClassifier.__init__)["loss"]
    hinted = typing.get_args(next(a for a in typing.get_args(hint) if a is not type(None)))
    assert tuple(hinted) == tuple(LOSSES)
    accepted = LOSSES
    assert tuple(choices) == tuple(accepted) and {"hce-aware", "hce", "ce"} <= set(choices)


def test_predict_writes_the_output_contract_and_leaves_the_input_alone(files):
    before = _digest(files["h5ad"])
    out = files["root"] / "annotated.h5ad"
    result = _run("predict", files["model"], files["h5ad"], "--out", out, "--coarse-threshold", 0.7)
    assert result.exit_code == 0, result.output
    assert f"Annotated {files['adata'].n_obs} cells" in result.output
    assert _digest(files["h5ad"]) == before
    annotated = ad.read_h5ad(out)
    assert list(annotated.obs_names) == list(files["adata"].obs_names)
    for column in OBS_CONTRACT:
        assert column in annotated.obs, column
    for key in ("schce_probabilities", "schce_hierarchical_scores", "X_schce"):
        assert key in annotated.obsm, key
    assert annotated.uns["schce"]["coarse_threshold"] == pytest.approx(0.7)
    # same numbers as the Python API on the same cells
    model = schce.HCEClassifier.load(files["model"])
    expected = model.predict(files["adata"].copy(), coarse_threshold=0.7, inplace=False)
    np.testing.assert_allclose(annotated.obs["schce_confidence"], expected["schce_confidence"], atol=1e-6)
    assert (annotated.obs["schce_prediction"].astype(str) == expected["schce_prediction"].astype(str)).all()
    probs = np.asarray(annotated.obsm["schce_probabilities"])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    # the original data and metadata are carried over
    assert (annotated.obs[LABELS] == files["adata"].obs[LABELS]).all()
    assert abs(annotated.X - files["adata"].X).sum() == 0

    # an existing output is refused unless --overwrite; the input is never an output
    stamp = _digest(out)
    line = _one_error_line(_run("predict", files["model"], files["h5ad"], "--out", out))
    assert "already exists" in line and _digest(out) == stamp
    line = _one_error_line(_run("predict", files["model"], files["h5ad"], "--out", files["h5ad"], "--overwrite"))
    assert "input" in line and _digest(files["h5ad"]) == before
    result = _run("predict", files["model"], files["h5ad"], "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert ad.read_h5ad(out).uns["schce"]["coarse_threshold"] == pytest.approx(0.5)


def test_evaluate_writes_sane_tables_and_prints_a_summary(files):
    out = files["root"] / "report"
    result = _run("evaluate", files["model"], files["h5ad"], "--labels-key", "cell_type", "--out", out,
                  "--groupby", "phase", "--groupby", "donor")  # fmt: skip
    assert result.exit_code == 0, result.output
    for name in ("overall_metrics.csv", "per_class_metrics.csv", "per_phase_metrics.csv", "per_donor_metrics.csv"):
        assert (out / name).is_file(), name
    assert (out / "detailed_results.parquet").is_file()
    overall = pd.read_csv(out / "overall_metrics.csv", index_col=0)["value"]
    assert overall["n_cells"] == files["adata"].n_obs and overall["n_not_scorable"] == 0
    for metric in ("accuracy", "macro_f1", "corrected_accuracy", "corrected_macro_f1"):
        assert 0 <= overall[metric] <= 1
    assert overall["corrected_accuracy"] >= overall["accuracy"]
    assert overall["accuracy"] > 0.3  # 3 epochs on 10 PBMC types: well above chance (0.1)
    per_class = pd.read_csv(out / "per_class_metrics.csv", index_col=0)
    assert per_class["support"].sum() == files["adata"].n_obs
    per_donor = pd.read_csv(out / "per_donor_metrics.csv", index_col=0)
    assert sorted(per_donor.index) == ["d1", "d2"]
    # the printed summary shows the numbers of the written table
    printed = {line.split()[0]: line.split()[1] for line in result.output.splitlines() if line.startswith("  ")}
    assert float(printed["corrected_macro_f1"]) == pytest.approx(overall["corrected_macro_f1"], abs=1e-4)
    assert int(printed["n_cells"]) == files["adata"].n_obs

    # a non-empty report directory is not written into without --overwrite
    line = _one_error_line(_run("evaluate", files["model"], files["h5ad"], "--labels-key", LABELS, "--out", out))
    assert "not empty" in line


@pytest.mark.parametrize("command", ["train", "predict", "evaluate"])
def test_missing_input_file_is_one_line(files, command):
    missing = files["root"] / "nope.h5ad"
    out = files["root"] / f"never_{command}"
    args = {
        "train": ["train", missing, "--labels-key", LABELS, "--out", out],
        "predict": ["predict", files["model"], missing, "--out", out],
        "evaluate": ["evaluate", files["model"], missing, "--labels-key", LABELS, "--out", out],
    }[command]
    line = _one_error_line(_run(*args))
    assert line == f"Error: Input {missing} does not exist."
    assert not out.exists()


def test_wrong_labels_key_and_bad_model_dir_are_one_line(files):
    out = files["root"] / "never"
    line = _one_error_line(_run("train", files["h5ad"], "--labels-key", "celltype", "--out", out))
    assert "--labels-key 'celltype' is not a column of obs" in line and "cell_type_ontology_term_id" in line
    line = _one_error_line(_run("evaluate", files["model"], files["h5ad"], "--labels-key", "celltype", "--out", out))
    assert "--labels-key 'celltype' is not a column of obs" in line
    line = _one_error_line(
        _run("evaluate", files["model"], files["h5ad"], "--labels-key", LABELS, "--groupby", "tissue", "--out", out)
    )
    assert "--groupby 'tissue'" in line
    line = _one_error_line(_run("train", files["h5ad"], "--labels-key", LABELS, "--layer", "counts", "--out", out))
    assert "--layer 'counts' is not a layer" in line
    line = _one_error_line(_run("predict", files["model"], files["h5ad"], "--gene-symbols", "ensembl", "--out", out))
    assert "--gene-symbols 'ensembl' is not a column of var" in line
    line = _one_error_line(_run("predict", files["root"], files["h5ad"], "--out", out))
    assert "is not a schce model directory" in line
    line = _one_error_line(_run("predict", files["root"] / "no_model", files["h5ad"], "--out", out))
    assert "does not exist" in line
    not_h5ad = files["root"] / "junk.h5ad"
    not_h5ad.write_text("not hdf5")
    line = _one_error_line(_run("predict", files["model"], not_h5ad, "--out", out))
    assert "is not a readable .h5ad file" in line
    assert not out.exists()


def test_library_errors_are_one_line_and_debug_shows_the_traceback(files, monkeypatch, capsys):
    from schce import cli as cli_module

    # labels that are not Cell Ontology terms fail inside setup_anndata, after the file checks
    args = ["train", str(files["h5ad"]), "--labels-key", "phase", "--out", str(files["root"] / "never")]
    monkeypatch.setattr("sys.argv", ["schce", *args])
    with pytest.raises(SystemExit) as exc:
        cli_module.main()
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "could not be mapped" in errors[0]
    monkeypatch.setattr("sys.argv", ["schce", "--debug", *args])
    with pytest.raises(schce.LabelMappingError):
        cli_module.main()


def test_predict_and_evaluate_take_a_saved_ensemble(files, tmp_path):
    adata = files["adata"].copy()
    schce.HCEEnsemble.setup_anndata(adata, labels_key=LABELS)
    ensemble = schce.HCEEnsemble(adata, n_members=2, **SMALL_MLP)
    ensemble.train(seed=0, max_epochs=1, enable_progress_bar=False)
    ensemble.save(tmp_path / "ens")
    out = tmp_path / "annotated.h5ad"
    result = _run("predict", tmp_path / "ens", files["h5ad"], "--out", out)
    assert result.exit_code == 0, result.output
    annotated = ad.read_h5ad(out)
    expected = ensemble.predict(files["adata"].copy())
    np.testing.assert_array_equal(
        annotated.obs["schce_prediction_ontology_term_id"].astype(str), expected["schce_prediction_ontology_term_id"]
    )
    assert annotated.uns["schce"]["model"] == "HCEEnsemble" and annotated.uns["schce"]["n_members"] == 2
    result = _run("evaluate", tmp_path / "ens", files["h5ad"], "--labels-key", LABELS, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "overall_metrics.csv").is_file()
    (tmp_path / "ens" / "member-1" / "schce.json").write_text("{}")
    line = _one_error_line(_run("predict", tmp_path / "ens", files["h5ad"], "--out", tmp_path / "again.h5ad"))
    assert "member-1/schce.json does not match the checksum" in line


def test_train_with_n_members_saves_a_seed_ensemble(files, tmp_path):
    out = tmp_path / "ens"
    result = _run("train", files["h5ad"], "--labels-key", LABELS, "--out", out, "--max-epochs", 2, "--seed", 3,
                  "--n-members", 2, "--no-progress", *SMALL)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Trained an ensemble of 2 HCE-AWARE mlp models" in result.output
    ensemble = schce.HCEEnsemble.load(out)
    assert ensemble.n_members == 2 and ensemble.seeds_ == [3, 1003]
    # one line per member, each its own kept epoch's validation score
    for i, member in enumerate(ensemble.members):
        line = next(line for line in result.output.splitlines() if line.startswith(f"Member {i} (seed {3 + 1000 * i})"))
        best = member.history_["validation_corrected_macro_f1"].iloc[:, 0].loc[member.best_epoch_]
        assert float(line.split("macro F1 = ")[1]) == pytest.approx(best, abs=1e-4)
    # the same as the library's ensemble trained with the same arguments
    adata = files["adata"].copy()
    schce.HCEEnsemble.setup_anndata(adata, labels_key=LABELS)
    expected = schce.HCEEnsemble(adata, n_members=2, **SMALL_MLP)
    expected.train(seed=3, max_epochs=2, enable_progress_bar=False)
    query = files["adata"].copy()
    np.testing.assert_allclose(
        ensemble.predict(query.copy(), inplace=False)["schce_confidence"],
        expected.predict(query.copy(), inplace=False)["schce_confidence"],
        atol=1e-5,
    )
    line = _one_error_line(
        _run("train", files["h5ad"], "--labels-key", LABELS, "--out", tmp_path / "x", "--n-members", 0)
    )
    assert "--n-members" in line
