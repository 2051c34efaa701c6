"""Evaluation tasks and summaries shared by ``benchmarks/`` and the tests (one definition, no test imports a script).

Nothing here reads ``../shared``: callers pass the data in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

LABELS = "cell_type_ontology_term_id"

# Mixed granularity: in the larger training batch the annotators only said "T cell" and "monocyte".
COARSEN = {
    "CL:0000624": "CL:0000084",  # CD4 αβ T → T cell
    "CL:0000625": "CL:0000084",  # CD8 αβ T → T cell
    "CL:0001054": "CL:0000576",  # CD14 monocyte → monocyte
    "CL:0002396": "CL:0000576",  # CD16 monocyte → monocyte
}


def leave_one_batch_out(
    adata: AnnData, mixed: bool = False, batch_key: str = "batch", labels_key: str = LABELS
) -> Iterator[tuple[str, AnnData, AnnData]]:
    """Yield ``(held-out batch, train, test)`` for every ``obs[batch_key]`` value.

    ``train.obs["training_label"]`` holds the training labels: the true CL IDs, or with ``mixed=True`` the CL IDs
    with CD4/CD8 T and CD14/CD16 monocytes coarsened (:data:`COARSEN`) to T cell / monocyte in the larger training
    batch. The test cells keep their fine labels in ``obs[labels_key]``.
    """
    for test_batch in sorted(adata.obs[batch_key].unique()):
        train = adata[adata.obs[batch_key] != test_batch].copy()
        test = adata[adata.obs[batch_key] == test_batch].copy()
        labels = train.obs[labels_key].astype(str)
        if mixed:
            larger = train.obs[batch_key].value_counts().idxmax()
            in_larger = (train.obs[batch_key] == larger).to_numpy()
            labels[in_larger] = labels[in_larger].replace(COARSEN)
        train.obs["training_label"] = labels.to_numpy()
        yield test_batch, train, test


def per_label_summary(per_seed: Sequence[dict[str, list[tuple[float, int]]]]) -> pd.DataFrame:
    """Per true label: its score averaged over the folds that test it, then mean and sd over seeds.

    Parameters
    ----------
    per_seed
        One dict per seed: ``{label: [(score, test cells), ...]}`` with one tuple per fold that tests the label.

    Returns
    -------
    One row per label (index), columns ``mean``, ``sd`` (population sd over the seeds that test the label) and
    ``cells`` (test cells per fold, averaged).
    """
    rows = {}
    for label in sorted({lab for seed in per_seed for lab in seed}):
        runs = [np.asarray(seed[label], dtype=float) for seed in per_seed if label in seed]
        scores = [r[:, 0].mean() for r in runs]
        rows[label] = {
            "mean": float(np.mean(scores)),
            "sd": float(np.std(scores)),
            "cells": float(np.mean([r[:, 1].mean() for r in runs])),
        }
    return pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "sd", "cells"])
