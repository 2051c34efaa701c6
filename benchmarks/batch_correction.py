"""HCE alone versus HCE + an adversarial batch term / + batch mixing, on held-out 10x PBMC runs.

Leave-one-batch-out on ../shared/data/real/symphony_pbmcs_small_3batches_counts_CL.h5ad (standard and
mixed-granularity training labels), seeds 0-2. Prints one line per (task, method): mean ± sd over seeds of the
hierarchy-corrected and exact macro F1 on the held-out batch, and the batch-mixing score of the embedding of
training plus held-out cells (1 = every neighbourhood holds all batches equally).

Run: ``.venv/bin/python benchmarks/batch_correction.py [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._tasks import LABELS, SYMPHONY, leave_one_batch_out, ready

METHODS = {
    "HCE": {},
    "HCE + adversarial batch": {"adversarial_weight": 1.0},
    "HCE + batch mixing": {"batch_mixing_weight": 1.0},
}


def run(adata: ad.AnnData, mixed: bool, aux: dict, seed: int) -> tuple[float, float, float]:
    """Mean over held-out batches of (corrected macro F1, exact macro F1, batch-mixing score)."""
    import schce
    from schce.metrics import batch_mixing_score, classification_scores

    rows = []
    for _, train, test in leave_one_batch_out(adata, mixed):
        schce.HCEClassifier.setup_anndata(train, labels_key="training_label", batch_key="batch")
        model = schce.HCEClassifier(train)
        model.train(seed=seed, enable_progress_bar=False, **aux)
        pred = model.predict(test)["schce_prediction_ontology_term_id"].astype(str).to_numpy()
        s = classification_scores(test.obs[LABELS].astype(str).to_numpy(), pred, model.hierarchy)
        both = ad.concat([train, test])
        mixing = batch_mixing_score(model.get_latent_representation(both), both.obs["batch"].astype(str))
        rows.append((s["corrected_macro_f1"], s["macro_f1"], mixing))
    return tuple(np.mean(rows, axis=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if not ready():
        return
    adata = ad.read_h5ad(SYMPHONY)
    for mixed in (False, True):
        task = "symphony LOBO" + (" mixed granularity" if mixed else "")
        for method, aux in METHODS.items():
            t0 = time.perf_counter()
            res = np.array([run(adata, mixed, aux, seed) for seed in args.seeds])
            mean, sd = res.mean(0), res.std(0)
            print(
                f"{task} | {method}: corrected macro F1 {mean[0]:.3f} ± {sd[0]:.3f}, exact macro F1 "
                f"{mean[1]:.3f} ± {sd[1]:.3f}, batch mixing {mean[2]:.3f} ± {sd[2]:.3f} "
                f"({len(args.seeds)} seeds, {time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
