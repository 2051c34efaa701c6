"""The HCE paper's evaluation convention, checked against scikit-learn with explicit label sets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import classification_report, f1_score

from schce.evaluation import paper_evaluation
from schce.hierarchy import Hierarchy
from schce.metrics import paper_report

# 0 > 1 > 2, 0 > 3; 4 and 5 stand alone.
CHILD = np.eye(6, dtype=int)
CHILD[0, [1, 2, 3]] = 1
CHILD[1, 2] = 1


def _reference(true, predicted, label_set):
    """The published scripts: correct_labels on the child matrix, then scikit-learn on the corrected predictions."""
    corrected = np.array([t if CHILD[t, p] else p for t, p in zip(true, predicted, strict=True)])
    labels = np.union1d(true, corrected) if label_set == "union" else np.unique(true)
    report = classification_report(true, corrected, labels=labels, output_dict=True, zero_division=0)
    micro = report["accuracy"] if "accuracy" in report else report["micro avg"]["f1-score"]
    return (
        corrected,
        labels,
        {
            "macro_f1": f1_score(true, corrected, labels=labels, average="macro", zero_division=0),
            "weighted_f1": f1_score(true, corrected, labels=labels, average="weighted", zero_division=0),
            "micro_f1": micro,
            "accuracy": float(np.mean(corrected == true)),
        },
    )


@pytest.mark.parametrize("label_set", ["union", "true"])
@pytest.mark.parametrize("seed", range(5))
def test_paper_report_matches_sklearn(label_set, seed):
    rng = np.random.default_rng(seed)
    true = rng.choice([0, 1, 2, 3], size=200, p=[0.1, 0.3, 0.4, 0.2])  # 4 and 5 are only ever predicted
    predicted = np.where(rng.random(200) < 0.6, true, rng.integers(0, 6, 200))
    overall, per_class = paper_report(true, predicted, CHILD, label_set)
    corrected, labels, expected = _reference(true, predicted, label_set)
    for key, value in expected.items():
        assert overall[key] == pytest.approx(value, abs=1e-12), key
    assert overall["n_labels_scored"] == len(labels)
    np.testing.assert_array_equal(per_class.index, labels)
    np.testing.assert_allclose(
        per_class["f1"], f1_score(true, corrected, labels=labels, average=None, zero_division=0), atol=1e-12
    )


def test_union_and_true_label_sets_differ_as_published():
    # Truth 1 predicted 2 (a descendant: correct); truth 2 predicted 0 (an ancestor: wrong); truth 3 predicted 4.
    true, predicted = np.array([1, 2, 3, 3]), np.array([2, 0, 4, 3])
    union, _ = paper_report(true, predicted, CHILD, "union")
    by_true, _ = paper_report(true, predicted, CHILD, "true")
    # Labels true ∪ predicted = {0, 1, 2, 3, 4}: F1 = 0, 1, 0, 2/3, 0. Labels of the truth {1, 2, 3}: 1, 0, 2/3.
    assert union["macro_f1"] == pytest.approx((1 + 2 / 3) / 5)
    assert by_true["macro_f1"] == pytest.approx((1 + 2 / 3) / 3)
    assert union["accuracy"] == by_true["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="label_set"):
        paper_report(true, predicted, CHILD, "all")
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        paper_report(np.array([6]), np.array([0]), CHILD)


def test_paper_evaluation_drops_cells_outside_the_labels():
    labels = [f"CL:000000{i}" for i in range(6)]
    hierarchy = Hierarchy.from_child_matrix(labels, CHILD)
    rng = np.random.default_rng(0)
    true_codes = rng.integers(0, 6, 50)
    probs = rng.dirichlet(np.ones(6), size=50)
    true_terms = np.array([labels[c] for c in true_codes], dtype=object)
    true_terms[:7] = "CL:0000236"  # not a model label: dropped
    for convention, label_set in (("paper", "union"), ("paper_ood", "true")):
        result = paper_evaluation(true_terms, probs, hierarchy, convention)
        assert result["n_cells"] == 50 and result["n_dropped"] == 7 and result["n_scored"] == 43
        _, _, expected = _reference(true_codes[7:], probs[7:].argmax(1), label_set)
        assert result["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12)
        assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
        assert not result.detailed["kept"].iloc[:7].any() and result.detailed["kept"].iloc[7:].all()
        assert set(result.per_class.index) <= set(labels)
    with pytest.raises(ValueError, match="convention"):
        paper_evaluation(true_terms, probs, hierarchy, "schce")
    assert isinstance(result.per_class, pd.DataFrame)


@pytest.mark.parametrize("seed", range(3))
def test_union_macro_f1_is_torchmetrics_macro_f1(seed):
    # The paper selects epochs on torchmetrics' MulticlassF1Score(average="macro") of the corrected predictions.
    import torch
    from torchmetrics.classification import MulticlassF1Score

    rng = np.random.default_rng(seed)
    true = rng.choice([0, 1, 2, 3], size=300)
    predicted = np.where(rng.random(300) < 0.5, true, rng.integers(0, 5, 300))
    overall, _ = paper_report(true, predicted, CHILD, "union")
    corrected = np.where(CHILD[true, predicted] > 0, true, predicted)
    metric = MulticlassF1Score(num_classes=6, average="macro")
    expected = float(metric(torch.as_tensor(corrected), torch.as_tensor(true)))
    assert overall["macro_f1"] == pytest.approx(expected, abs=1e-6)
