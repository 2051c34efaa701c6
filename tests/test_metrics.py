import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from schce.hierarchy import Hierarchy
from schce.metrics import classification_scores, code_scores, correct_codes, f1, per_class_counts

HCE_EDGES = [("A", "B"), ("A", "C"), ("B", "D"), ("B", "E"), ("C", "E")]
AVERAGES = ("macro", "micro", "weighted")


@pytest.fixture
def hce() -> Hierarchy:
    return Hierarchy.from_edges(HCE_EDGES)


def _sklearn_f1(true, pred, average):
    return f1_score(true, pred, labels=np.unique(true), average=average, zero_division=0)


# ---------------------------------------------------------------------- f1 against scikit-learn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("average", AVERAGES)
def test_f1_matches_sklearn_integers(seed, average):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    true = rng.integers(0, 6, size=n)
    # Predictions range over 0..8: labels 6..8 never occur in true.
    pred = np.where(rng.random(n) < 0.5, true, rng.integers(0, 9, size=n))
    assert f1(true, pred, average) == pytest.approx(_sklearn_f1(true, pred, average), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("average", AVERAGES)
def test_f1_matches_sklearn_strings(seed, average):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 200))
    true_pool = np.array(["T cell", "B cell", "NK cell", "monocyte"])
    pred_pool = np.concatenate([true_pool, ["platelet", "erythrocyte"]])
    true = rng.choice(true_pool[: int(rng.integers(1, 5))], size=n)
    pred = np.where(rng.random(n) < 0.4, true, rng.choice(pred_pool, size=n))
    assert f1(list(true), list(pred), average) == pytest.approx(_sklearn_f1(true, pred, average), abs=1e-12)


@pytest.mark.parametrize("average", AVERAGES)
def test_f1_matches_sklearn_all_predictions_absent(average):
    true = [0, 0, 1, 2]
    pred = [5, 6, 5, 7]
    assert f1(true, pred, average) == 0.0
    assert _sklearn_f1(true, pred, average) == 0.0


# ---------------------------------------------------------------------- hand-computed example


# true = [a, a, b, c, c, c], pred = [a, b, b, c, a, d]
#
#              pred a  pred b  pred c  pred d
#   true a        1       1       0       0
#   true b        0       1       0       0
#   true c        1       0       1       1
#
#   a: tp 1, fp 1 (c->a), fn 1 (a->b)  F1 = 2/(2+1+1) = 1/2
#   b: tp 1, fp 1 (a->b), fn 0         F1 = 2/(2+1+0) = 2/3
#   c: tp 1, fp 0,        fn 2         F1 = 2/(2+0+2) = 1/2
#   d: absent from true, not scored (its prediction is a false negative of c only)
#   macro = (1/2 + 2/3 + 1/2) / 3 = 5/9
#   micro = 2*3 / (2*3 + 2 + 3) = 6/11
#   weighted = (2*1/2 + 1*2/3 + 3*1/2) / 6 = 19/36
HAND_TRUE = ["a", "a", "b", "c", "c", "c"]
HAND_PRED = ["a", "b", "b", "c", "a", "d"]


def test_per_class_counts_hand_example():
    labels, tp, fp, fn = per_class_counts(HAND_TRUE, HAND_PRED)
    assert labels.tolist() == ["a", "b", "c"]
    assert tp.tolist() == [1, 1, 1]
    assert fp.tolist() == [1, 1, 0]
    assert fn.tolist() == [1, 0, 2]
    assert (tp + fn).tolist() == [2, 1, 3]  # support


def test_f1_hand_example():
    assert f1(HAND_TRUE, HAND_PRED) == pytest.approx(5 / 9)
    assert f1(HAND_TRUE, HAND_PRED, "macro") == pytest.approx(5 / 9)
    assert f1(HAND_TRUE, HAND_PRED, "micro") == pytest.approx(6 / 11)
    assert f1(HAND_TRUE, HAND_PRED, "weighted") == pytest.approx(19 / 36)


def test_f1_perfect_and_integers():
    assert f1([3, 1, 2, 3], [3, 1, 2, 3]) == 1.0
    labels, tp, fp, fn = per_class_counts([3, 1, 1], [1, 1, 9])
    assert labels.tolist() == [1, 3]
    assert tp.tolist() == [1, 0]
    assert fp.tolist() == [1, 0]
    assert fn.tolist() == [1, 1]


# ---------------------------------------------------------------------- hierarchy-corrected scores

# true      = [B, B, D, C, E]
# predicted = [D, A, D, E, E]
# corrected = [B, A, D, C, E]: D is under B (correct), A is B's ancestor (wrong), E is under C (correct).
#
# exact:     B tp 0 fp 0 fn 2 -> 0;  C tp 0 fp 0 fn 1 -> 0
#            D tp 1 fp 1 fn 0 -> 2/3; E tp 1 fp 1 fn 0 -> 2/3
#            accuracy 2/5, macro (2/3 + 2/3) / 4 = 1/3, micro 4/(4+2+3) = 4/9, weighted (2/3 + 2/3) / 5 = 4/15
# corrected: B tp 1 fp 0 fn 1 -> 2/3; C, D, E tp 1 fp 0 fn 0 -> 1  (A: absent from true, not scored)
#            accuracy 4/5, macro (2/3 + 3) / 4 = 11/12, micro 8/(8+0+1) = 8/9, weighted (2*2/3 + 3) / 5 = 13/15
TRUE = ["B", "B", "D", "C", "E"]
PRED = ["D", "A", "D", "E", "E"]
EXPECTED = {
    "accuracy": 2 / 5,
    "macro_f1": 1 / 3,
    "micro_f1": 4 / 9,
    "weighted_f1": 4 / 15,
    "corrected_accuracy": 4 / 5,
    "corrected_macro_f1": 11 / 12,
    "corrected_micro_f1": 8 / 9,
    "corrected_weighted_f1": 13 / 15,
}


def test_corrected_predictions_hand_example(hce):
    assert hce.correct_predictions(PRED, TRUE).tolist() == ["B", "A", "D", "C", "E"]


def test_classification_scores_hand_example(hce):
    scores = classification_scores(TRUE, PRED, hce)
    assert set(scores) == set(EXPECTED)
    for key, value in EXPECTED.items():
        assert scores[key] == pytest.approx(value), key


def test_classification_scores_match_sklearn(hce):
    rng = np.random.default_rng(7)
    terms = np.array(hce.terms)
    true = rng.choice(terms, size=300)
    pred = rng.choice(terms, size=300)
    scores = classification_scores(true, pred, hce)
    corrected = hce.correct_predictions(pred, true).astype(str)
    for average in AVERAGES:
        assert scores[f"{average}_f1"] == pytest.approx(_sklearn_f1(true, pred, average))
        assert scores[f"corrected_{average}_f1"] == pytest.approx(_sklearn_f1(true, corrected, average))
    assert scores["accuracy"] == pytest.approx(np.mean(true == pred))
    assert scores["corrected_accuracy"] == pytest.approx(np.mean(hce.is_correct(pred, true)))
    assert scores["corrected_accuracy"] > scores["accuracy"]


def test_code_scores_hand_example(hce):
    true = hce.label_index(TRUE)
    pred = hce.label_index(PRED)
    assert true.tolist() == [1, 1, 3, 2, 4]
    assert pred.tolist() == [3, 0, 3, 4, 4]
    assert correct_codes(true, pred, hce.R).tolist() == [1, 0, 3, 2, 4]
    scores = code_scores(true, pred, hce.R)
    assert set(scores) == {"accuracy", "macro_f1", "corrected_accuracy", "corrected_macro_f1"}
    for key, value in scores.items():
        assert value == pytest.approx(EXPECTED[key]), key


@pytest.mark.parametrize("seed", range(4))
def test_code_scores_agree_with_classification_scores(hce, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 100))
    true_codes = rng.integers(0, 5, size=n)
    pred_codes = rng.integers(0, 5, size=n)
    labels = np.array(hce.labels, dtype=object)
    true, pred = labels[true_codes], labels[pred_codes]
    corrected = correct_codes(true_codes, pred_codes, hce.R)
    assert labels[corrected].tolist() == hce.correct_predictions(pred, true).tolist()
    by_code = code_scores(true_codes, pred_codes, hce.R)
    by_label = classification_scores(true, pred, hce)
    for key, value in by_code.items():
        assert value == pytest.approx(by_label[key]), key


def test_correct_codes_uses_reachability_direction():
    # R[i, j] = 1: j is i or a descendant of i. Label 0 is the parent of label 1.
    R = np.array([[1, 1], [0, 1]])
    assert correct_codes(np.array([0, 1, 0, 1]), np.array([1, 0, 0, 1]), R).tolist() == [0, 0, 0, 1]


def test_correct_codes_rejects_length_mismatch(hce):
    with pytest.raises(ValueError):
        correct_codes(np.array([0, 1]), np.array([3]), hce.R)


def test_code_scores_length_mismatch_raises_value_error(hce):
    with pytest.raises(ValueError):
        code_scores(np.array([0, 1, 2]), np.array([3, 1]), hce.R)


def test_code_scores_accepts_lists(hce):
    scores = code_scores([1, 1, 3, 2, 4], [3, 0, 3, 4, 4], hce.R)
    assert scores["accuracy"] == pytest.approx(2 / 5)


# ---------------------------------------------------------------------- edge cases and validation


@pytest.mark.parametrize("average", AVERAGES)
def test_f1_empty_is_nan(average):
    assert math.isnan(f1([], [], average))


def test_classification_scores_empty_is_nan(hce):
    scores = classification_scores([], [], hce)
    assert set(scores) == set(EXPECTED)
    assert all(math.isnan(v) for v in scores.values())


def test_mismatched_lengths_raise(hce):
    with pytest.raises(ValueError, match="length"):
        f1([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="length"):
        per_class_counts(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        classification_scores(["A", "B"], ["A"], hce)


@pytest.mark.parametrize("average", ["binary", "samples", "Macro", "", None])
def test_bad_average_raises(average):
    with pytest.raises(ValueError, match="average"):
        f1([1, 2], [1, 2], average)


def test_batch_mixing_score_extremes_and_hand_value():
    from schce.metrics import batch_mixing_score

    # two far-apart groups, each a single batch: no mixing
    emb = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    assert batch_mixing_score(emb, ["a", "a", "a", "b", "b", "b"], n_neighbors=2) == 0.0
    # alternating a,b,a,b,a,b on a line, 2 neighbours: cell 0 sees (b, a) -> 1 bit, cell 5 sees (a, b) -> 1 bit,
    # cells 1..4 see their two same-batch neighbours at distance 1 -> 0; mean 2/6
    emb = np.arange(6, dtype=float)[:, None]
    assert batch_mixing_score(emb, ["a", "b"] * 3, n_neighbors=2) == pytest.approx(1 / 3)
    # a,a,b,b with 3 neighbours: every cell sees one of its batch and two of the other:
    # H = -(1/3 ln 1/3 + 2/3 ln 2/3) = 0.636514, / ln 2 = 0.918296
    emb = np.arange(4, dtype=float)[:, None]
    assert batch_mixing_score(emb, ["a", "a", "b", "b"], n_neighbors=3) == pytest.approx(0.918296, abs=1e-6)
    with pytest.raises(ValueError, match="two batches"):
        batch_mixing_score(emb, ["a"] * 4)
