"""Where the benchmarks find the real data (../shared/data/real); the tasks themselves live in schce._benchmarking."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from schce._benchmarking import COARSEN, LABELS, leave_one_batch_out

SHARED_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
SYMPHONY = SHARED_REAL / "symphony_pbmcs_small_3batches_counts_CL.h5ad"

__all__ = ["COARSEN", "LABELS", "SHARED_REAL", "SYMPHONY", "leave_one_batch_out", "ready"]


def ready() -> bool:
    """Whether the real data are there (else say so); silences warnings and Lightning's chatter for the run."""
    if not SHARED_REAL.exists():
        print(f"skipped: {SHARED_REAL} is absent (the benchmarks need ../shared/data/real beside the repository)")
        return False
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # One line per figure: the library's progress messages stay out (CellTypist turns root logging on at INFO).
    for name in ("schce", "celltypist", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return True
