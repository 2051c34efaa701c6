"""Building and writing the prediction output contract (see DESIGN.md)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from schce.hierarchy import Hierarchy

logger = logging.getLogger(__name__)


def prediction_frame(
    probabilities: np.ndarray, hierarchy: Hierarchy, obs_names: pd.Index, key_added: str, coarse_threshold: float
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-cell predictions, per-label probabilities and per-term subtree scores.

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

    def categorical(values: np.ndarray, categories: list[str]) -> pd.Categorical:
        # Every label is a category, sorted as scanpy sorts, so colours match across queries and label columns.
        return pd.Categorical(values, categories=sorted(set(categories)))

    obs = pd.DataFrame(
        {
            f"{key_added}_prediction": categorical(np.asarray(label_names, dtype=object)[best], label_names),
            f"{key_added}_prediction_ontology_term_id": categorical(np.asarray(labels, dtype=object)[best], labels),
            f"{key_added}_confidence": probabilities[np.arange(len(best)), best].astype(np.float32),
            f"{key_added}_prediction_coarse": categorical(coarse_names, sorted(set(coarse_names))),
            f"{key_added}_prediction_coarse_ontology_term_id": categorical(coarse_ids, sorted(set(coarse_ids))),
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
) -> None:
    """Write predictions into ``adata``; only schce's own keys change, and overwriting them is logged."""
    replaced = [k for k in obs.columns if k in adata.obs.columns]
    replaced += [f"obsm[{k!r}]" for k in obsm if k in adata.obsm]
    replaced += [f"uns[{key_added!r}]"] if key_added in adata.uns else []
    if replaced:
        logger.info("Overwriting earlier schce outputs: %s.", ", ".join(replaced))
    for column in obs.columns:
        adata.obs[column] = (
            obs[column].to_numpy() if not isinstance(obs[column].dtype, pd.CategoricalDtype) else obs[column].values
        )
    for key, value in obsm.items():
        adata.obsm[key] = value
    adata.uns[key_added] = uns
