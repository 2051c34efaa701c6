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
    adata: AnnData,
    mixed: bool = False,
    batch_key: str = "batch",
    labels_key: str = LABELS,
    within_source: float = 0.0,
    seed: int = 0,
) -> Iterator[tuple[str, AnnData, AnnData]]:
    """Yield ``(held-out batch, train, test)`` for every ``obs[batch_key]`` value.

    ``train.obs["training_label"]`` holds the training labels: the true CL IDs, or with ``mixed=True`` the CL IDs
    with CD4/CD8 T and CD14/CD16 monocytes coarsened (:data:`COARSEN`) to T cell / monocyte in the larger training
    batch. With ``within_source=f`` instead, a random share ``f`` of those cells in *every* training batch is
    coarsened (one source annotating some cells finely and others of the same kind coarsely). The test cells keep
    their fine labels in ``obs[labels_key]``.
    """
    for test_batch in sorted(adata.obs[batch_key].unique()):
        train = adata[adata.obs[batch_key] != test_batch].copy()
        test = adata[adata.obs[batch_key] == test_batch].copy()
        labels = train.obs[labels_key].astype(str)
        if mixed:
            larger = train.obs[batch_key].value_counts().idxmax()
            in_larger = (train.obs[batch_key] == larger).to_numpy()
            labels[in_larger] = labels[in_larger].replace(COARSEN)
        if within_source:
            pick = np.random.default_rng([seed, len(train)]).random(len(train)) < within_source
            labels[pick] = labels[pick].replace(COARSEN)
        train.obs["training_label"] = labels.to_numpy()
        yield test_batch, train, test


# pbmc68k's T-cell labels (regulatory, CD8 αβ, CD4 memory, naive CD8, naive CD4): a coarse study calls them "T cell".
PBMC68K_T_CELLS = ("CL:0000815", "CL:0000625", "CL:0000897", "CL:0000900", "CL:0000895")
T_CELL = "CL:0000084"


def mix_granularity(
    adata: AnnData,
    fine_terms: Sequence[str],
    coarse_term: str,
    labels_key: str = LABELS,
    fraction: float = 0.5,
    seed: int = 0,
) -> AnnData:
    """A copy of ``adata`` annotated by two studies at different depths: the situation annotation-aware HCE is for.

    A random ``fraction`` of the cells forms "study B (coarse)", whose annotators called every cell of
    ``fine_terms`` only ``coarse_term``; the rest, "study A (fine)", keep their labels. Writes
    ``obs["study"]`` and ``obs["annotation"]`` (the training labels); ``obs[labels_key]`` keeps the truth.
    """
    out = adata.copy()
    coarse_study = np.random.default_rng(seed).random(out.n_obs) < fraction
    labels = out.obs[labels_key].astype(str).to_numpy().copy()
    labels[coarse_study & np.isin(labels, list(fine_terms))] = coarse_term
    out.obs["study"] = pd.Categorical(np.where(coarse_study, "study B (coarse)", "study A (fine)"))
    out.obs["annotation"] = labels
    return out


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
