"""Real-data tasks shared by the benchmarks and the real-data tests (data in ../shared/data/real)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata as ad

SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SYMPHONY = SHARED_REAL / "symphony_pbmcs_small_3batches_counts_CL.h5ad"
LABELS = "cell_type_ontology_term_id"

# Mixed granularity: in the larger training batch the annotators only said "T cell" and "monocyte".
COARSEN = {
    "CL:0000624": "CL:0000084",  # CD4 αβ T → T cell
    "CL:0000625": "CL:0000084",  # CD8 αβ T → T cell
    "CL:0001054": "CL:0000576",  # CD14 monocyte → monocyte
    "CL:0002396": "CL:0000576",  # CD16 monocyte → monocyte
}


def leave_one_batch_out(adata: ad.AnnData, mixed: bool = False) -> Iterator[tuple[str, ad.AnnData, ad.AnnData]]:
    """Yield ``(held-out batch, train, test)`` for every ``obs["batch"]`` value.

    ``train.obs["training_label"]`` holds the training labels: the true CL IDs, or with ``mixed=True`` the CL IDs
    with CD4/CD8 T and CD14/CD16 monocytes coarsened to T cell / monocyte in the larger training batch. The test
    cells keep their fine labels in ``obs[LABELS]``.
    """
    for test_batch in sorted(adata.obs["batch"].unique()):
        train = adata[adata.obs["batch"] != test_batch].copy()
        test = adata[adata.obs["batch"] == test_batch].copy()
        labels = train.obs[LABELS].astype(str)
        if mixed:
            larger = train.obs["batch"].value_counts().idxmax()
            in_larger = (train.obs["batch"] == larger).to_numpy()
            labels[in_larger] = labels[in_larger].replace(COARSEN)
        train.obs["training_label"] = labels.to_numpy()
        yield test_batch, train, test


def ready() -> bool:
    """Whether the real data are there (else say so); silences warnings and Lightning's chatter for the run."""
    if not SHARED_REAL.exists():
        print(f"skipped: {SHARED_REAL} is absent (the benchmarks need ../shared/data/real beside the repository)")
        return False
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return True
