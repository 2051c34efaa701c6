"""Building and writing the prediction output contract (see DESIGN.md)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData

from schce.hierarchy import Hierarchy

logger = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
NO_EXPRESSION = "no expression in the model's genes"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_key_added(key_added) -> None:
    """Refuse a ``key_added`` that would give keys such as ``_prediction`` or ``X_``, or break h5ad paths."""
    if not isinstance(key_added, str) or not _KEY.fullmatch(key_added):
        raise ValueError(
            f"key_added must be a non-empty name of letters, digits, '_', '.' or '-' (starting with a letter or "
            f"digit), got {key_added!r}. The default is 'schce'."
        )


def output_keys(key_added: str) -> dict[str, list[str]]:
    """Every key :meth:`~schce.HCEClassifier.predict` writes, by place."""
    obs = ["prediction", "prediction_ontology_term_id", "confidence", "prediction_coarse"]
    obs += ["prediction_coarse_ontology_term_id", "unassigned_reason"]
    return {
        "obs": [f"{key_added}_{c}" for c in obs],
        "obsm": [f"{key_added}_probabilities", f"{key_added}_hierarchical_scores", f"X_{key_added}"],
    }


def _written_before(adata: AnnData, key_added: str) -> set[tuple[str, str]]:
    """The ``(place, key)`` entries an earlier ``predict`` recorded in ``uns[key_added]``; empty when none."""
    prev = adata.uns.get(key_added)
    if not isinstance(prev, Mapping) or "schce_version" not in prev:
        return set()
    written = prev.get("written")
    if not isinstance(written, Mapping):  # written by a schce that did not record its keys: its fixed names
        written = output_keys(key_added)
    ours = {(place, str(k)) for place in ("obs", "obsm") for k in np.asarray(written.get(place, []), dtype=str)}
    return ours | {("uns", key_added)}


def check_output_keys(adata: AnnData, key_added: str, overwrite: bool = False) -> list[str]:
    """Refuse to overwrite entries that ``predict`` did not write; return those it will replace (its own).

    Run before any work. ``overwrite=True`` replaces foreign entries of the same names too.
    """
    check_key_added(key_added)
    planned = output_keys(key_added)
    present = [("obs", c) for c in planned["obs"] if c in adata.obs.columns]
    present += [("obsm", k) for k in planned["obsm"] if k in adata.obsm]
    present += [("uns", key_added)] if key_added in adata.uns else []
    ours = _written_before(adata, key_added)
    foreign = [f"{place}[{key!r}]" for place, key in present if (place, key) not in ours]
    if foreign and not overwrite:
        raise ValueError(
            f"adata already holds {', '.join(foreign)}, which schce did not write. Pass key_added= another prefix "
            "(e.g. key_added='schce2'), rename that entry, or pass overwrite=True to replace it."
        )
    if foreign:
        logger.warning("Overwriting entries schce did not write (overwrite=True): %s.", ", ".join(foreign))
    return [f"{place}[{key!r}]" for place, key in present]


def prediction_frame(
    probabilities: np.ndarray,
    hierarchy: Hierarchy,
    obs_names: pd.Index,
    key_added: str,
    coarse_threshold: float,
    empty: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-cell predictions, per-label probabilities and per-term subtree scores.

    Cells flagged in ``empty`` (no expression in the model's genes) are called ``"unassigned"`` with confidence 0
    and the reason in ``{key}_unassigned_reason``; their probability rows are the model's output for a zero input.

    Returns
    -------
    ``(obs columns, probabilities, hierarchical scores)``, all indexed by ``obs_names``.
    """
    labels = list(hierarchy.labels)
    label_names = hierarchy.names(labels)
    best = probabilities.argmax(axis=1)
    scores = hierarchy.subtree_scores(probabilities)
    coarse = hierarchy.coarse_terms(scores, coarse_threshold)
    terms = np.asarray(hierarchy.terms, dtype=object)
    term_names = np.asarray(hierarchy.names(hierarchy.terms), dtype=object)
    coarse_ids = terms[coarse]
    coarse_names = term_names[coarse]
    pred_names = np.asarray(label_names, dtype=object)[best]
    pred_ids = np.asarray(labels, dtype=object)[best]
    confidence = probabilities[np.arange(len(best)), best].astype(np.float32)
    empty = np.zeros(len(best), dtype=bool) if empty is None else np.asarray(empty, dtype=bool)
    for column in (pred_names, pred_ids, coarse_ids, coarse_names):
        column[empty] = UNASSIGNED
    confidence[empty] = 0.0
    extra = [UNASSIGNED] if empty.any() else []
    if empty.any():
        logger.warning(
            "%d of %d cell(s) have no expression in the model's genes: called %r with confidence 0 (reason in "
            "obs[%r]).",
            int(empty.sum()),
            len(empty),
            UNASSIGNED,
            f"{key_added}_unassigned_reason",
        )

    def categorical(values: np.ndarray, categories: list[str]) -> pd.Categorical:
        # Every label is a category, sorted as scanpy sorts, so colours match across queries and label columns.
        return pd.Categorical(values, categories=sorted(set(categories)))

    obs = pd.DataFrame(
        {
            f"{key_added}_prediction": categorical(pred_names, [*label_names, *extra]),
            f"{key_added}_prediction_ontology_term_id": categorical(pred_ids, [*labels, *extra]),
            f"{key_added}_confidence": confidence,
            f"{key_added}_prediction_coarse": categorical(coarse_names, sorted(set(coarse_names))),
            f"{key_added}_prediction_coarse_ontology_term_id": categorical(coarse_ids, sorted(set(coarse_ids))),
            f"{key_added}_unassigned_reason": pd.Categorical(
                np.where(empty, NO_EXPRESSION, None), categories=[NO_EXPRESSION]
            ),
        },
        index=obs_names,
    )
    probs = pd.DataFrame(probabilities.astype(np.float32), index=obs_names, columns=labels)
    hier = pd.DataFrame(scores.astype(np.float32), index=obs_names, columns=list(hierarchy.terms))
    return obs, probs, hier


def write_outputs(
    adata: AnnData,
    obs: pd.DataFrame,
    obsm: dict[str, np.ndarray | pd.DataFrame],
    uns: dict,
    key_added: str,
    overwrite: bool = False,
) -> None:
    """Write predictions into ``adata``; only schce's own keys change, and overwriting them is logged.

    What is written is recorded in ``uns[key_added]["written"]``, so a later run knows which keys are schce's.
    """
    replaced = check_output_keys(adata, key_added, overwrite)
    if replaced:
        logger.info("Overwriting earlier schce outputs: %s.", ", ".join(replaced))
    for column in obs.columns:
        adata.obs[column] = (
            obs[column].to_numpy() if not isinstance(obs[column].dtype, pd.CategoricalDtype) else obs[column].values
        )
    for key, value in obsm.items():
        adata.obsm[key] = value
    adata.uns[key_added] = {**uns, "written": {"obs": list(obs.columns), "obsm": list(obsm)}}
