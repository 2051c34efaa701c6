"""Evaluation tables checked number by number against hand-computed values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import assert_unchanged, snapshot

import schce
from schce.evaluation import evaluate_predictions, resolve_truth

T, B, CD4, CD8 = "CL:0000084", "CL:0000236", "CL:0000624", "CL:0000625"
NAIVE_CD8, LYMPHOCYTE, HEPATOCYTE, CELL = "CL:0000900", "CL:0000542", "CL:0000182", "CL:0000000"


@pytest.fixture(scope="module")
def onto():
    return schce.load_cell_ontology()


@pytest.fixture(scope="module")
def hierarchy(onto):
    return schce.Hierarchy.from_ontology([T, B, CD4, CD8], onto)


# cell: (truth, {label: probability}); labels absent from a row share nothing (probability 0)
CELLS = [
    (T, {CD4: 0.7, T: 0.1, CD8: 0.1, B: 0.1}),  # 1 pred CD4, a descendant of the truth: corrected-correct
    (CD4, {T: 0.6, CD4: 0.3, CD8: 0.05, B: 0.05}),  # 2 pred T, an ancestor of the truth: wrong
    (CD8, {CD8: 0.8, T: 0.1, CD4: 0.05, B: 0.05}),  # 3 exact
    (NAIVE_CD8, {CD8: 0.9, T: 0.05, CD4: 0.03, B: 0.02}),  # 4 finer than the model -> CD8, exact
    (NAIVE_CD8, {CD4: 0.4, CD8: 0.35, T: 0.05, B: 0.2}),  # 5 finer -> CD8, pred CD4 wrong; unsure: backs off
    (B, {B: 0.95, T: 0.02, CD4: 0.02, CD8: 0.01}),  # 6 exact
    (B, {CD8: 0.7, B: 0.2, T: 0.05, CD4: 0.05}),  # 7 wrong
    (HEPATOCYTE, {B: 0.6, T: 0.4}),  # 8 no model ancestor below the root: not scorable
    (CELL, {T: 0.7, B: 0.3}),  # 9 the root itself: not scorable
    (LYMPHOCYTE, {B: 0.9, T: 0.1}),  # 10 coarser than the model; B is a descendant: corrected-correct
]


def _inputs(hierarchy):
    truth = [t for t, _ in CELLS]
    probs = np.array([[row.get(label, 0.0) for label in hierarchy.labels] for _, row in CELLS])
    obs = pd.DataFrame({"assay": ["v2"] * 5 + ["5p"] * 5}, index=[f"c{i}" for i in range(1, 11)])
    return truth, probs, obs


def test_resolve_truth(hierarchy, onto):
    truth, probs, _ = _inputs(hierarchy)
    pred = np.asarray(hierarchy.labels, dtype=object)[probs.argmax(1)]
    eff, status = resolve_truth(truth, pred, hierarchy, onto.ancestors)
    assert list(eff) == [T, CD4, CD8, CD8, CD8, B, B, None, None, LYMPHOCYTE]
    assert list(status) == ["label"] * 3 + ["finer"] * 2 + ["label"] * 2 + ["not_scorable"] * 2 + ["coarser"]


def test_every_number_of_the_overall_and_per_class_tables(hierarchy, onto):
    truth, probs, obs = _inputs(hierarchy)
    res = evaluate_predictions(truth, probs, hierarchy, onto.ancestors, obs=obs, groupby=("assay", "tissue"))
    # scored cells 1-7 and 10: effective truth [T, CD4, CD8, CD8, CD8, B, B, lymph]
    # predictions                              [CD4, T, CD8, CD8, CD4, B, CD8, B]
    # corrected (descendant of truth -> truth)  [T, T, CD8, CD8, CD4, B, CD8, lymph]
    expected = {
        "n_cells": 10,
        "n_scored": 8,
        "n_model_label": 5,
        "n_coarser_than_model": 1,
        "n_finer_than_model": 2,
        "n_not_scorable": 2,
        "accuracy": 3 / 8,
        # exact F1 per truth class: T 0, CD4 0, CD8 2·2/(2·2+1+1) = 2/3, B 2·1/(2+1+1) = 1/2, lymph 0
        "macro_f1": (2 / 3 + 1 / 2) / 5,
        "micro_f1": 6 / 16,  # tp 3, fp 5, fn 5
        "weighted_f1": (3 * 2 / 3 + 2 * 1 / 2) / 8,
        "corrected_accuracy": 5 / 8,
        # corrected F1: T 2/3, CD4 0, CD8 2/3, B 2/3, lymph 1
        "corrected_macro_f1": (2 / 3 + 2 / 3 + 2 / 3 + 1) / 5,
        "corrected_micro_f1": 10 / 16,  # tp 5, fp 3, fn 3
        "corrected_weighted_f1": (1 * 2 / 3 + 3 * 2 / 3 + 2 * 2 / 3 + 1) / 8,
        "coarse_threshold": 0.5,
        "coarse_backoff_fraction": 1 / 8,  # only cell 5 (no label ≥ 0.5; mature αβ T subtree 0.75)
        # right when the coarse term is the truth or an ancestor: cells 2 (T for CD4), 3, 4, 5 (mature αβ T for
        # CD8), 6; wrong: 1 and 10 (CD4 for T, B for lymphocyte: finer than the truth), 7 (CD8 for a B cell)
        "coarse_accuracy": 5 / 8,
        # confidences 0.7 ✓, 0.6 ✗, 0.8 ✓, 0.9 ✓, 0.4 ✗, 0.95 ✓, 0.7 ✗, 0.9 ✓ in 15 bins:
        # |0.7-0.5|·2 + 0.6 + 0.2 + 0.1·2 + 0.4 + 0.05 = 1.85, / 8
        "expected_calibration_error": 1.85 / 8,
    }
    assert list(res.overall.index) == list(expected)
    for key, value in expected.items():
        assert res[key] == pytest.approx(value, abs=1e-12), key

    pc = res.per_class
    assert list(pc.index) == sorted([T, CD4, CD8, B, LYMPHOCYTE])
    assert pc.loc[T, "name"] == "T cell" and pc.loc[LYMPHOCYTE, "name"] == "lymphocyte"
    np.testing.assert_array_equal(
        pc["support"], [pc_support for pc_support in pc.index.map({T: 1, B: 2, CD4: 1, CD8: 3, LYMPHOCYTE: 1})]
    )
    exact = {T: (0, 0, 0), B: (1 / 2, 1 / 2, 1 / 2), CD4: (0, 0, 0), CD8: (2 / 3, 2 / 3, 2 / 3), LYMPHOCYTE: (0, 0, 0)}
    corrected = {
        T: (1 / 2, 1, 2 / 3),
        B: (1, 1 / 2, 2 / 3),
        CD4: (0, 0, 0),
        CD8: (2 / 3, 2 / 3, 2 / 3),
        LYMPHOCYTE: (1, 1, 1),
    }
    for label in pc.index:
        np.testing.assert_allclose(pc.loc[label, ["precision", "recall", "f1"]].astype(float), exact[label])
        np.testing.assert_allclose(
            pc.loc[label, ["corrected_precision", "corrected_recall", "corrected_f1"]].astype(float), corrected[label]
        )

    assert set(res.per_group) == {"assay"}  # absent columns are skipped
    g = res.per_group["assay"]
    assert g.loc["v2", "n_cells"] == 5 and g.loc["v2", "n_scored"] == 5
    assert g.loc["v2", "accuracy"] == pytest.approx(2 / 5) and g.loc["v2", "corrected_accuracy"] == pytest.approx(3 / 5)
    assert g.loc["5p", "n_scored"] == 3
    assert g.loc["5p", "accuracy"] == pytest.approx(1 / 3) and g.loc["5p", "corrected_accuracy"] == pytest.approx(2 / 3)

    d = res.detailed
    assert list(d.index) == list(obs.index)
    # the deepest term whose subtree reaches 0.5: mature αβ T cell (CD4 0.4 + CD8 0.35), below T cell
    assert d.loc["c5", "coarse"] == "CL:0000791" and d.loc["c5", "coarse_correct"]
    assert d.loc["c5", "effective_true"] == CD8 and not d.loc["c5", "correct"]
    assert d.loc["c8", "status"] == "not_scorable" and d.loc["c8", "effective_true"] == ""
    np.testing.assert_allclose(d[[f"p:{label}" for label in hierarchy.labels]].to_numpy(), probs)


def test_write_tables(hierarchy, onto, tmp_path):
    truth, probs, obs = _inputs(hierarchy)
    res = evaluate_predictions(truth, probs, hierarchy, onto.ancestors, obs=obs)
    res.write(tmp_path / "report")
    files = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert files == [
        "detailed_results.parquet",
        "overall_metrics.csv",
        "per_assay_metrics.csv",
        "per_class_metrics.csv",
    ]
    back = pd.read_csv(tmp_path / "report" / "overall_metrics.csv", index_col=0)
    assert back.loc["corrected_macro_f1", "value"] == pytest.approx(0.6)
    detailed = pd.read_parquet(tmp_path / "report" / "detailed_results.parquet")
    pd.testing.assert_frame_equal(detailed, res.detailed, check_names=False)


def test_model_evaluate_on_labelled_cells(trained, pbmc, tmp_path):
    adata = pbmc.copy()
    adata.obs["truth"] = adata.obs["cell_type"].astype(str)  # names are mapped to CL IDs
    labels = adata.obs["truth"].to_numpy().copy()
    labels[:4] = "CD8-positive, alpha-beta cytotoxic T cell"  # finer than the model's CD8 αβ T cell
    labels[4:6] = "hepatocyte"  # nothing to score it against
    adata.obs["truth"] = labels
    adata.obs["tissue"] = np.where(np.arange(adata.n_obs) < 350, "blood", "bone marrow")
    before = snapshot(adata)
    res = trained.evaluate(adata, labels_key="truth", output_dir=tmp_path / "eval")
    assert_unchanged(adata, before)
    assert res["n_cells"] == 700 and res["n_finer_than_model"] == 4 and res["n_not_scorable"] == 2
    assert res["n_scored"] == 698 and 0 <= res["corrected_macro_f1"] <= 1
    assert res["corrected_accuracy"] >= res["accuracy"]
    assert set(res.per_group) == {"tissue"} and res.per_group["tissue"]["n_cells"].sum() == 700
    assert (tmp_path / "eval" / "per_tissue_metrics.csv").exists()
    # the evaluation's predictions are predict()'s
    df = trained.predict(pbmc.copy(), inplace=False)
    np.testing.assert_array_equal(res.detailed["predicted"], df["schce_prediction_ontology_term_id"].astype(str))
    with pytest.raises(KeyError, match="labels_key='nope'"):
        trained.evaluate(adata, labels_key="nope")


def test_calibration_is_fitted_stored_and_applied(trained, pbmc, tmp_path):
    t = trained.temperature_
    assert np.isfinite(t) and 0.05 <= t <= 20 and t != 1.0
    cal = trained.predict(pbmc.copy(), inplace=False)
    raw = trained.predict(pbmc.copy(), inplace=False, calibrated=False)
    pd.testing.assert_series_equal(cal["schce_prediction"], raw["schce_prediction"])
    assert not np.allclose(cal["schce_confidence"], raw["schce_confidence"])
    trained.save(tmp_path / "m")
    assert schce.HCEClassifier.load(tmp_path / "m").temperature_ == t
    q = pbmc.copy()
    trained.predict(q)
    assert q.uns["schce"]["temperature"] == pytest.approx(t)


def test_temperature_fit_recovers_a_known_temperature():
    from schce.train import fit_temperature

    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 6)) * 2
    y = np.array([rng.choice(6, p=np.exp(z) / np.exp(z).sum()) for z in true_logits])
    # a model twice as confident as the data warrants
    assert fit_temperature(true_logits * 2, y) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(true_logits, y) == pytest.approx(1.0, rel=0.1)


def test_in_memory_ontology_is_not_taken_for_a_path(pbmc_copy):
    onto = schce.load_cell_ontology()
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key="cell_type_ontology_term_id", ontology=onto)
    model = schce.HCEClassifier(pbmc_copy, n_hidden=16, n_layers=1)
    assert model.registry_["setup_args"]["ontology"] is None
    model.train(max_epochs=1, enable_progress_bar=False)
    res = model.evaluate(pbmc_copy, "cell_type_ontology_term_id", ontology=onto)
    assert res["n_scored"] == pbmc_copy.n_obs
