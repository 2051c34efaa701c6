"""Exact and hierarchy-corrected classification metrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from schce.hierarchy import Hierarchy


def per_class_counts(true: Sequence, predicted: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True positives, false positives, false negatives and support for every label present in ``true``.

    Returns
    -------
    ``(labels, tp, fp, fn)``; ``support = tp + fn``.
    """
    true, predicted = np.asarray(true), np.asarray(predicted)
    if true.shape != predicted.shape:
        raise ValueError(f"true and predicted differ in length: {true.shape} vs {predicted.shape}.")
    codes, uniques = pd.factorize(np.concatenate([true, predicted]), sort=True)
    t, p = codes[: len(true)], codes[len(true) :]
    k = len(uniques)
    tp = np.bincount(t[t == p], minlength=k)
    fp = np.bincount(p[t != p], minlength=k)
    fn = np.bincount(t[t != p], minlength=k)
    present = np.bincount(t, minlength=k) > 0
    return np.asarray(uniques)[present], tp[present], fp[present], fn[present]


def f1(true: Sequence, predicted: Sequence, average: str = "macro") -> float:
    """F1 score over the labels present in ``true`` (the out-of-distribution protocol of scTab).

    Predictions of labels absent from ``true`` count as false positives of no class, so they lower recall only.

    Parameters
    ----------
    true, predicted
        One label per cell.
    average
        ``"macro"``, ``"micro"`` or ``"weighted"``.
    """
    if average not in ("macro", "micro", "weighted"):
        raise ValueError(f"average must be 'macro', 'micro' or 'weighted', got {average!r}.")
    labels, tp, fp, fn = per_class_counts(true, predicted)
    if len(labels) == 0:
        return float("nan")
    if average == "micro":
        denom = 2 * tp.sum() + fp.sum() + fn.sum()
        return float(2 * tp.sum() / denom) if denom else 0.0
    denom = 2 * tp + fp + fn
    scores = np.divide(2 * tp, denom, out=np.zeros(len(tp), dtype=np.float64), where=denom > 0)
    if average == "macro":
        return float(scores.mean())
    return float(np.average(scores, weights=tp + fn))


def correct_codes(true: np.ndarray, predicted: np.ndarray, reachability: np.ndarray) -> np.ndarray:
    """The correctness rule on label indices: ``predicted`` replaced by ``true`` where ``R[true, predicted]``.

    Same rule as :meth:`Hierarchy.correct_predictions`, for integer codes (used during training).
    """
    true, predicted = np.asarray(true), np.asarray(predicted)
    if true.shape != predicted.shape:
        raise ValueError(f"true and predicted differ in length: {true.shape} vs {predicted.shape}.")
    return np.where(np.asarray(reachability, dtype=bool)[true, predicted], true, predicted)


def code_scores(true: np.ndarray, predicted: np.ndarray, reachability: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1, exact and hierarchy-corrected, on label indices."""
    true, predicted = np.asarray(true), np.asarray(predicted)
    corrected = correct_codes(true, predicted, reachability)
    return {
        "accuracy": float(np.mean(predicted == true)),
        "macro_f1": f1(true, predicted),
        "corrected_accuracy": float(np.mean(corrected == true)),
        "corrected_macro_f1": f1(true, corrected),
    }


def classification_scores(true: Sequence[str], predicted: Sequence[str], hierarchy: Hierarchy) -> dict[str, float]:
    """Accuracy and macro / micro / weighted F1, exact and hierarchy-corrected.

    Hierarchy-corrected scores first replace every prediction that is the true label or one of its descendants
    by the true label (:meth:`Hierarchy.is_correct`); predicting an ancestor stays wrong.

    Parameters
    ----------
    true, predicted
        One term per cell.
    hierarchy
        The hierarchy that defines descendants.

    Returns
    -------
    Keys ``accuracy``, ``macro_f1``, ``micro_f1``, ``weighted_f1`` and the same with a ``corrected_`` prefix.
    """
    true = np.asarray(true, dtype=object)
    predicted = np.asarray(predicted, dtype=object)
    corrected = hierarchy.correct_predictions(predicted, true)
    out: dict[str, float] = {}
    for prefix, pred in (("", predicted), ("corrected_", corrected)):
        out[f"{prefix}accuracy"] = float(np.mean(pred == true)) if len(true) else float("nan")
        for average in ("macro", "micro", "weighted"):
            out[f"{prefix}{average}_f1"] = f1(true, pred, average)
    return out


def batch_mixing_score(embeddings: np.ndarray, batches: Sequence, n_neighbors: int = 15) -> float:
    """How well batches mix in an embedding: the mean normalised entropy of each cell's neighbourhood batches.

    For every cell the ``n_neighbors`` nearest other cells (Euclidean) are found; the entropy of their batch
    composition is divided by ``log(n_batches)``. 1 means every neighbourhood holds all batches equally, 0 means
    every neighbourhood is a single batch.

    Parameters
    ----------
    embeddings
        ``(n_cells, n_dims)``.
    batches
        One batch per cell; at least two distinct values.
    n_neighbors
        Neighbourhood size.
    """
    from sklearn.neighbors import NearestNeighbors

    embeddings = np.asarray(embeddings, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(batches))
    if len(uniques) < 2:
        raise ValueError("batch_mixing_score needs at least two batches.")
    if len(codes) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(codes)} batch values.")
    k = min(n_neighbors, len(codes) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(embeddings).kneighbors(embeddings)
    neighbours = codes[idx[:, 1:]]  # drop each cell itself
    counts = np.stack([(neighbours == b).sum(1) for b in range(len(uniques))], axis=1) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(counts > 0, counts * np.log(counts), 0.0).sum(1)
    return float(entropy.mean() / np.log(len(uniques)))


def per_class_table(true: Sequence, predicted: Sequence) -> pd.DataFrame:
    """Precision, recall, F1 and support of every label present in ``true``.

    Returns
    -------
    DataFrame indexed by label, columns ``precision``, ``recall``, ``f1``, ``support``.
    """
    labels, tp, fp, fn = per_class_counts(true, predicted)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros(len(a), dtype=np.float64), where=b > 0)

    return pd.DataFrame(
        {
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "support": (tp + fn).astype(np.int64),
        },
        index=pd.Index(labels, name="label"),
    )


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: the support-weighted gap between confidence and accuracy in equal-width bins.

    Parameters
    ----------
    confidence
        Probability of each prediction, in ``[0, 1]``.
    correct
        Whether each prediction was right.
    n_bins
        Number of bins over ``[0, 1]``.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return float("nan")
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.sum() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(total / len(confidence))


#: Label sets of the HCE paper's evaluation scripts: ``"union"`` (in-distribution test split: scikit-learn's
#: ``classification_report`` without ``labels``, i.e. true ∪ predicted, as torchmetrics' macro F1 also counts them)
#: and ``"true"`` (out-of-distribution datasets: ``labels=np.unique(y_true)``).
PAPER_LABEL_SETS = ("union", "true")


def paper_report(
    true: np.ndarray, predicted: np.ndarray, child_matrix: np.ndarray, label_set: str = "union"
) -> tuple[dict[str, float], pd.DataFrame]:
    """Scores computed as the HCE paper's evaluation code computes them, on label codes.

    Every prediction that the published rule accepts (``child_matrix[true, predicted] != 0``: the truth or one of
    its descendants) is replaced by the truth; precision, recall and F1 per label then follow scikit-learn's
    ``classification_report`` (0 where a denominator is 0) over the labels of ``label_set`` (see
    :data:`PAPER_LABEL_SETS`). ``micro_f1`` is the corrected accuracy when the label set holds every true and
    predicted label, else the micro average over the label set, as scikit-learn reports it.

    Parameters
    ----------
    true, predicted
        Label codes (row / column indices of ``child_matrix``), one per cell.
    child_matrix
        ``(n_labels, n_labels)``, ``[i, j] != 0`` iff label ``j`` is label ``i`` or a descendant (scTab's
        ``child_matrix.npy``, a checkpoint's ``child_lookup``); used as given.
    label_set
        ``"union"`` (in-distribution) or ``"true"`` (out-of-distribution).

    Returns
    -------
    ``(overall, per_class)``: ``overall`` has ``n_cells``, ``n_labels_scored``, ``accuracy`` (corrected),
    ``macro_f1``, ``micro_f1`` and ``weighted_f1``; ``per_class`` is indexed by code with ``precision``, ``recall``,
    ``f1`` and ``support``.
    """
    if label_set not in PAPER_LABEL_SETS:
        raise ValueError(f"label_set must be one of {PAPER_LABEL_SETS}, got {label_set!r}.")
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    if true.shape != predicted.shape:
        raise ValueError(f"true and predicted differ in length: {true.shape} vs {predicted.shape}.")
    child = np.asarray(child_matrix) != 0
    if len(true) and (min(true.min(), predicted.min()) < 0 or max(true.max(), predicted.max()) >= len(child)):
        raise ValueError(f"Label codes must lie in [0, {len(child)}) to index the child matrix.")
    corrected = np.where(child[true, predicted], true, predicted)
    labels = np.union1d(true, corrected) if label_set == "union" else np.unique(true)
    k = len(child)
    tp = np.bincount(true[true == corrected], minlength=k)[labels]
    fp = np.bincount(corrected[true != corrected], minlength=k)[labels]
    fn = np.bincount(true[true != corrected], minlength=k)[labels]
    precision = np.divide(tp, tp + fp, out=np.zeros(len(labels)), where=tp + fp > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros(len(labels)), where=tp + fn > 0)
    f1s = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros(len(labels)), where=2 * tp + fp + fn > 0)
    support = tp + fn
    if set(labels.tolist()) >= set(np.union1d(true, corrected).tolist()):
        micro = float(np.mean(true == corrected)) if len(true) else float("nan")
    else:
        denom = 2 * tp.sum() + fp.sum() + fn.sum()
        micro = float(2 * tp.sum() / denom) if denom else 0.0
    overall = {
        "n_cells": float(len(true)),
        "n_labels_scored": float(len(labels)),
        "accuracy": float(np.mean(true == corrected)) if len(true) else float("nan"),
        "macro_f1": float(f1s.mean()) if len(labels) else float("nan"),
        "micro_f1": micro,
        "weighted_f1": float(np.average(f1s, weights=support)) if support.sum() else 0.0,
    }
    per_class = pd.DataFrame(
        {"precision": precision, "recall": recall, "f1": f1s, "support": support}, index=pd.Index(labels, name="code")
    )
    return overall, per_class
