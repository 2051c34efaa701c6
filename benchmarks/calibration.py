"""Expected calibration error on held-out 10x PBMC runs, before and after temperature scaling.

Leave-one-batch-out on ../shared/data/real/symphony_pbmcs_small_3batches_counts_CL.h5ad with the default MLP
(``--loss`` to choose the loss): the temperature is fitted on the (in-distribution) validation cells after training;
the ECE is measured on the held-out batch. Prints one line per seed and one for the mean.

Run: ``.venv/bin/python benchmarks/calibration.py [--seeds 0 1 2]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._tasks import LABELS, SYMPHONY, leave_one_batch_out, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loss", default=None, help="training loss; default HCEClassifier's")
    args = parser.parse_args()
    if not ready():
        return
    import schce

    adata = ad.read_h5ad(SYMPHONY)
    rows = []
    for seed in args.seeds:
        for batch, train, test in leave_one_batch_out(adata):
            schce.HCEClassifier.setup_anndata(train, labels_key="training_label")
            model = schce.HCEClassifier(train, **({"loss": args.loss} if args.loss else {}))
            model.train(seed=seed, enable_progress_bar=False)
            before = model.evaluate(test, LABELS, groupby=(), calibrated=False)["expected_calibration_error"]
            after = model.evaluate(test, LABELS, groupby=())["expected_calibration_error"]
            rows.append((before, after, model.temperature_))
            print(
                f"seed {seed} held-out {batch}: temperature {model.temperature_:.3f}, "
                f"ECE {before:.4f} before, {after:.4f} after",
                flush=True,
            )
    b, a, t = np.mean(rows, axis=0)
    print(f"mean over {len(rows)} runs: temperature {t:.3f}, ECE {b:.4f} before, {a:.4f} after")


if __name__ == "__main__":
    main()
