"""Scoring predictions against true Cell Ontology labels: tables per class and per group, coarse calls, calibration."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from schce._io import write_file_atomically
from schce._output import coarse_calls
from schce.hierarchy import Hierarchy
from schce.metrics import expected_calibration_error, f1, paper_report, per_class_table

logger = logging.getLogger(__name__)

DEFAULT_GROUPBY = ("assay", "dataset_id", "disease", "tissue", "tissue_general")
#: ``"schce"``: schce's own evaluation (every cell counted, finer and coarser truths placed); ``"paper"``: the HCE
#: paper's in-distribution scores (macro F1 over true ∪ predicted labels); ``"paper_ood"``: its out-of-distribution
#: scores (macro F1 over the true labels). Both paper conventions drop cells whose truth is not a model label.
CONVENTIONS = ("schce", "paper", "paper_ood")
# How each cell's true label relates to the model's labels.
LABEL, COARSER, FINER, NOT_SCORABLE = "label", "coarser", "finer", "not_scorable"


@dataclass
class EvaluationResult:
    """Evaluation tables, as returned by :meth:`schce.HCEClassifier.evaluate` and :func:`evaluate_predictions`.

    Attributes
    ----------
    overall
        One ``value`` column indexed by metric: accuracy and macro / micro / weighted F1, exact and
        ``corrected_`` (scTab rule), over the scorable cells; cell counts by how the truth relates to the model's
        labels; the coarse back-off fraction and accuracy; the expected calibration error.
    per_class
        Per true label (after mapping finer labels to their nearest model ancestor): name, support, exact and
        corrected precision, recall and F1.
    per_group
        For every ``groupby`` column found in ``obs``: a table per value (cells, scorable cells, accuracy and macro
        F1, exact and corrected).
    detailed
        Per cell: true label, effective truth, status, prediction, corrected prediction, coarse call, confidence,
        the groupby metadata and the per-label probabilities (``p:<label>`` columns).
    hierarchy
        The model's hierarchy (label order and names, for plots).
    """

    overall: pd.DataFrame
    per_class: pd.DataFrame
    per_group: dict[str, pd.DataFrame] = field(default_factory=dict)
    detailed: pd.DataFrame | None = None
    hierarchy: Hierarchy | None = None

    def __getitem__(self, metric: str) -> float:
        """``result["corrected_macro_f1"]``: one number of the overall table."""
        return float(self.overall.loc[metric, "value"])

    def write(self, output_dir: str | os.PathLike) -> Path:
        """Write the tables into ``output_dir`` (created if needed), each file atomically.

        Files: ``overall_metrics.csv``, ``per_class_metrics.csv``, ``per_<column>_metrics.csv`` per groupby column
        and ``detailed_results.parquet``.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tables: dict[str, pd.DataFrame] = {"overall_metrics.csv": self.overall, "per_class_metrics.csv": self.per_class}
        tables.update({f"per_{col}_metrics.csv": table for col, table in self.per_group.items()})
        for name, table in tables.items():
            write_file_atomically(out / name, lambda p, t=table: t.to_csv(p))
        if self.detailed is not None:
            write_file_atomically(out / "detailed_results.parquet", lambda p: self.detailed.to_parquet(p))
        logger.info("Wrote evaluation tables to %s.", out)
        return out

    def __repr__(self) -> str:
        keys = ["n_cells", "n_not_scorable", "accuracy", "corrected_accuracy", "macro_f1", "corrected_macro_f1"]
        shown = ", ".join(f"{k}={self.overall.loc[k, 'value']:.4g}" for k in keys if k in self.overall.index)
        return f"EvaluationResult({shown}; per_group: {sorted(self.per_group) or 'none'})"


def resolve_truth(
    true_terms: Sequence[str], predicted: Sequence[str], hierarchy: Hierarchy, ancestors_of
) -> tuple[np.ndarray, np.ndarray]:
    """The term each cell is scored against, and why.

    - a model label, or an ancestor term of the labels (not a root): scored as it is;
    - a term finer than the model (outside its terms, with model labels among its ancestors): scored against its
      nearest model ancestor, the one the prediction satisfies when there are several;
    - anything else (a root, or no model ancestor below the root): not scorable.

    Parameters
    ----------
    true_terms, predicted
        One term per cell.
    hierarchy
        The model's hierarchy.
    ancestors_of
        ``term -> set of ancestor terms`` from the full ontology (for terms outside the hierarchy).

    Returns
    -------
    ``(effective truth (None where not scorable), status)`` per cell.
    """
    labels = set(hierarchy.labels)
    terms = set(hierarchy.terms)
    roots = {t for t in hierarchy.terms if not hierarchy.parents(t)}
    effective = np.empty(len(true_terms), dtype=object)
    status = np.empty(len(true_terms), dtype=object)
    nearest_cache: dict[str, list[str]] = {}
    for i, (t, p) in enumerate(zip(true_terms, predicted, strict=True)):
        if t in labels:
            effective[i], status[i] = t, LABEL
        elif t in terms and t not in roots:
            effective[i], status[i] = t, COARSER
        else:
            if t not in nearest_cache:
                candidates = [a for a in ancestors_of(t) if a in labels] if t not in terms else []
                # nearest: no other candidate lies below it
                nearest = [c for c in candidates if not any(c in hierarchy.ancestors(d) for d in candidates)]
                nearest_cache[t] = sorted(nearest, key=lambda c: (-hierarchy.depth[hierarchy.terms.index(c)], c))
            nearest = nearest_cache[t]
            if not nearest:
                effective[i], status[i] = None, NOT_SCORABLE
                continue
            hit = [c for c in nearest if p == c or c in hierarchy.ancestors(p)]
            effective[i], status[i] = (hit or nearest)[0], FINER
    return effective, status


def evaluate_predictions(
    true_terms: Sequence[str],
    probabilities: np.ndarray,
    hierarchy: Hierarchy,
    ancestors_of,
    obs: pd.DataFrame | None = None,
    groupby: Sequence[str] = DEFAULT_GROUPBY,
    coarse_threshold: float = 0.5,
    obs_names: Sequence[str] | None = None,
    convention: str = "schce",
) -> EvaluationResult:
    """Score per-label probabilities against true terms.

    Parameters
    ----------
    true_terms
        True CL IDs (or hierarchy terms), one per cell.
    probabilities
        ``(n_cells, n_labels)`` in ``hierarchy.labels`` order.
    hierarchy
        The model's hierarchy.
    ancestors_of
        ``term -> ancestor terms`` of the full ontology, e.g. ``ontology.ancestors``.
    obs
        Cell metadata holding the ``groupby`` columns.
    groupby
        Columns to break the metrics down by; those absent from ``obs`` are skipped.
    coarse_threshold
        Subtree probability for the coarse back-off call.
    obs_names
        Cell names for the detailed table.
    convention
        One of :data:`CONVENTIONS`; the paper conventions return :func:`paper_evaluation`.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    if convention != "schce":
        return paper_evaluation(true_terms, probabilities, hierarchy, convention, obs_names)
    true_terms = np.asarray(true_terms, dtype=object)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(true_terms), hierarchy.n_labels):
        raise ValueError(
            f"probabilities must be (n_cells, n_labels) = ({len(true_terms)}, {hierarchy.n_labels}), "
            f"got {probabilities.shape}."
        )
    labels = np.asarray(hierarchy.labels, dtype=object)
    best = probabilities.argmax(1)
    predicted = labels[best]
    confidence = probabilities[np.arange(len(best)), best]
    effective, status = resolve_truth(true_terms, predicted, hierarchy, ancestors_of)
    scored = status != NOT_SCORABLE
    correct = np.zeros(len(true_terms), dtype=bool)
    correct[scored] = hierarchy.is_correct(predicted[scored], effective[scored])
    corrected = np.where(correct, effective, predicted)

    terms = np.asarray(hierarchy.terms, dtype=object)
    coarse = terms[coarse_calls(probabilities, hierarchy, coarse_threshold)]  # in chunks: no cells × terms matrix
    # A coarse call is right when it is the truth or an ancestor of it: it may say less, never something else.
    coarse_ok = np.zeros(len(true_terms), dtype=bool)
    c_idx = pd.Index(hierarchy.terms).get_indexer(coarse[scored])
    t_idx = pd.Index(hierarchy.terms).get_indexer(effective[scored])
    coarse_ok[scored] = hierarchy.term_reach[c_idx, t_idx]

    calls = {
        "true": true_terms,
        "effective": effective,
        "status": status,
        "predicted": predicted,
        "corrected": corrected,
        "correct": correct,
        "confidence": confidence,
        "coarse": coarse,
        "coarse_correct": coarse_ok,
    }
    overall = _overall(calls, scored, coarse_threshold)
    eff, pred, corr = effective[scored], predicted[scored], corrected[scored]
    exact_tab, corr_tab = per_class_table(eff, pred), per_class_table(eff, corr)
    names = {t: hierarchy.name(t) if t in hierarchy.terms else t for t in exact_tab.index}
    per_class = pd.concat(
        [
            pd.DataFrame({"name": [names[t] for t in exact_tab.index]}, index=exact_tab.index),
            exact_tab,
            corr_tab.drop(columns="support").add_prefix("corrected_"),
        ],
        axis=1,
    )
    obs = obs if obs is not None else pd.DataFrame(index=range(len(true_terms)))
    per_group = {col: _group_table(obs, col, calls, scored) for col in groupby if col in obs.columns}
    index = pd.Index(obs_names if obs_names is not None else obs.index.astype(str), name="cell")
    detailed = _detailed(calls, hierarchy, index, {col: obs[col] for col in per_group}, probabilities)
    return EvaluationResult(overall, per_class, per_group, detailed, hierarchy)


def _overall(calls: dict[str, np.ndarray], scored: np.ndarray, coarse_threshold: float) -> pd.DataFrame:
    """The one-row-per-metric table: counts by truth status, exact and corrected scores, back-off, calibration."""
    status, effective = calls["status"], calls["effective"]
    eff, pred, corr = effective[scored], calls["predicted"][scored], calls["corrected"][scored]
    overall: dict[str, float] = {
        "n_cells": len(status),
        "n_scored": int(scored.sum()),
        "n_model_label": int((status == LABEL).sum()),
        "n_coarser_than_model": int((status == COARSER).sum()),
        "n_finer_than_model": int((status == FINER).sum()),
        "n_not_scorable": int((~scored).sum()),
    }
    for prefix, p in (("", pred), ("corrected_", corr)):
        overall[f"{prefix}accuracy"] = float(np.mean(p == eff)) if len(eff) else float("nan")
        for average in ("macro", "micro", "weighted"):
            overall[f"{prefix}{average}_f1"] = f1(eff, p, average)
    backed_off = calls["coarse"] != calls["predicted"]
    overall["coarse_threshold"] = coarse_threshold
    overall["coarse_backoff_fraction"] = float(backed_off[scored].mean()) if scored.any() else float("nan")
    overall["coarse_accuracy"] = float(calls["coarse_correct"][scored].mean()) if scored.any() else float("nan")
    overall["expected_calibration_error"] = expected_calibration_error(
        calls["confidence"][scored], calls["correct"][scored]
    )
    overall_df = pd.DataFrame({"value": pd.Series(overall, dtype=np.float64)})
    overall_df.index.name = "metric"
    return overall_df


def _group_table(obs: pd.DataFrame, col: str, calls: dict[str, np.ndarray], scored: np.ndarray) -> pd.DataFrame:
    """Exact and corrected scores of each value of ``obs[col]``."""
    predicted, effective, corrected = calls["predicted"], calls["effective"], calls["corrected"]
    values = obs[col].astype(str).to_numpy()
    rows = {}
    for value in pd.unique(values):
        m = values == value
        ms = m & scored
        rows[value] = {
            "n_cells": int(m.sum()),
            "n_scored": int(ms.sum()),
            "accuracy": float(np.mean(predicted[ms] == effective[ms])) if ms.any() else float("nan"),
            "corrected_accuracy": float(calls["correct"][ms].mean()) if ms.any() else float("nan"),
            "macro_f1": f1(effective[ms], predicted[ms]) if ms.any() else float("nan"),
            "corrected_macro_f1": f1(effective[ms], corrected[ms]) if ms.any() else float("nan"),
        }
    table = pd.DataFrame.from_dict(rows, orient="index").sort_index()
    table.index.name = col
    return table


def _detailed(calls: dict[str, np.ndarray], hierarchy: Hierarchy, index: pd.Index, groups: dict, probabilities):
    """One row per cell: the truth as scored, the calls and whether they are right, the groups, the probabilities."""
    detailed = pd.DataFrame(
        {
            "true": calls["true"].astype(str),
            "effective_true": [e if e is not None else "" for e in calls["effective"]],
            "status": calls["status"].astype(str),
            "predicted": calls["predicted"].astype(str),
            "predicted_name": [hierarchy.name(p) for p in calls["predicted"]],
            "corrected_prediction": calls["corrected"].astype(str),
            "correct": calls["correct"],
            "confidence": calls["confidence"],
            "coarse": calls["coarse"].astype(str),
            "coarse_correct": calls["coarse_correct"],
        },
        index=index,
    )
    for col, values in groups.items():
        detailed[col] = values.astype(str).to_numpy()
    probs = pd.DataFrame(probabilities, index=index, columns=[f"p:{label}" for label in hierarchy.labels])
    return pd.concat([detailed, probs], axis=1)


def paper_evaluation(
    true_terms: Sequence[str],
    probabilities: np.ndarray,
    hierarchy: Hierarchy,
    convention: str = "paper",
    obs_names: Sequence[str] | None = None,
) -> EvaluationResult:
    """The numbers of the HCE paper's evaluation code, to put beside its tables.

    As microsoft/hce-classification scores a model: cells whose true label is not one of the model's labels are
    dropped (counted in ``n_dropped``); the prediction is the arg-max label; it counts as the truth when the
    hierarchy's ``R`` accepts it (the truth or a descendant; for a model from
    :meth:`~schce.HCEClassifier.from_sctab_checkpoint` that is the checkpoint's ``child_lookup``); then
    :func:`schce.metrics.paper_report` with the label set of the convention: ``"paper"`` (in-distribution test
    split) true ∪ predicted labels, ``"paper_ood"`` the true labels.
    All F1 values are of the corrected predictions. ``per_group`` is empty.
    """
    if convention not in ("paper", "paper_ood"):
        raise ValueError(f"convention must be 'paper' or 'paper_ood', got {convention!r}.")
    true_terms = np.asarray(true_terms, dtype=object)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != (len(true_terms), hierarchy.n_labels):
        raise ValueError(
            f"probabilities must be (n_cells, n_labels) = ({len(true_terms)}, {hierarchy.n_labels}), "
            f"got {probabilities.shape}."
        )
    codes = pd.Index(hierarchy.labels).get_indexer(true_terms.astype(str))
    kept = codes >= 0
    if not kept.all():
        logger.info("Paper convention: dropping %d cell(s) whose label is not a model label.", int((~kept).sum()))
    predicted = probabilities.argmax(1)
    label_set = "union" if convention == "paper" else "true"
    report, per_class = paper_report(codes[kept], predicted[kept], hierarchy.R, label_set)
    report.pop("n_cells")
    overall = {"n_cells": len(true_terms), "n_dropped": int((~kept).sum()), "n_scored": int(kept.sum()), **report}
    overall_df = pd.DataFrame({"value": pd.Series(overall, dtype=np.float64)})
    overall_df.index.name = "metric"
    labels = np.asarray(hierarchy.labels, dtype=object)
    per_class.index = pd.Index(labels[per_class.index.to_numpy()], name="label")
    per_class.insert(0, "name", [hierarchy.name(t) for t in per_class.index])
    index = pd.Index(obs_names if obs_names is not None else np.arange(len(true_terms)).astype(str), name="cell")
    corrected = np.where(kept, predicted, -1)
    ok = kept & hierarchy.R[np.where(kept, codes, 0), predicted]
    corrected[ok] = codes[ok]
    detailed = pd.DataFrame(
        {
            "true": true_terms.astype(str),
            "kept": kept,
            "predicted": labels[predicted].astype(str),
            "corrected_prediction": np.where(kept, labels[np.maximum(corrected, 0)], "").astype(str),
            "correct": ok,
        },
        index=index,
    )
    return EvaluationResult(overall_df, per_class, {}, detailed, hierarchy)
