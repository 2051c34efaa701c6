"""Fine-tuning benchmark: adapt a model trained on one 10x PBMC run to another with a third of its cells labelled.

Task (Symphony PBMCs in ../shared/data/real; the script says so and exits when it is absent): train on batch 3pv2
only; a stratified third of batch 5p (drawn with the seed) is the labelled adaptation set, the other two thirds are the
evaluation cells. Methods, all with the package defaults:

- ``3pv2 only``: the model trained on 3pv2, before any fine-tuning (also scored on all of 5p);
- ``fine-tune``: that model, ``fine_tune`` on the labelled third (defaults: ``new_labels="add"``, 50 epochs at most,
  early stopping on a stratified tenth of the third);
- ``fine-tune head``: the same with ``freeze_encoder=True`` (only the output layer trains);
- ``scratch third``: a new model trained on the labelled third alone;
- ``scratch 3pv2+third``: a new model trained on 3pv2 and the labelled third together.

Prints one line per method: mean ± sd over seeds of the hierarchy-corrected and exact macro F1 and the corrected
accuracy on the evaluation cells, and the wall time per run. All methods are scored with one hierarchy (every label
of the data), so a label a model cannot predict counts as errors. 5p's single hematopoietic stem cell always falls in
the evaluation cells (a third of one cell rounds to none), so no method can get it right.

Run: ``.venv/bin/python benchmarks/fine_tune.py [--seeds 0 1 2] [--loss hce-aware|hce|ce]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._tasks import LABELS, SYMPHONY, ready

METHODS = ("3pv2 only, all 5p", "3pv2 only", "fine-tune", "fine-tune head", "scratch third", "scratch 3pv2+third")


def thirds(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labelled third, other two thirds)`` row indices, stratified by label (a label's single cell goes to one)."""
    rng = np.random.default_rng(seed)
    third, rest = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n = int(round(len(idx) / 3))
        third.append(idx[:n])
        rest.append(idx[n:])
    return np.sort(np.concatenate(third)), np.sort(np.concatenate(rest))


def run_seed(adata: ad.AnnData, seed: int, loss: str) -> dict[str, tuple[float, float, float, float]]:
    """``method -> (corrected macro F1, exact macro F1, corrected accuracy, seconds)`` for one seed."""
    import schce
    from schce.metrics import classification_scores

    source = adata[adata.obs["batch"] == "3pv2"].copy()
    target = adata[adata.obs["batch"] == "5p"].copy()
    third_idx, eval_idx = thirds(target.obs[LABELS].astype(str).to_numpy(), seed)
    third, evaluation = target[third_idx].copy(), target[eval_idx].copy()
    scoring = schce.Hierarchy.from_ontology(sorted(adata.obs[LABELS].astype(str).unique()))

    def score(model, cells: ad.AnnData = evaluation) -> tuple[float, float, float]:
        pred = model.predict(cells, inplace=False)["schce_prediction_ontology_term_id"].astype(str).to_numpy()
        res = classification_scores(cells.obs[LABELS].astype(str).to_numpy(), pred, scoring)
        return res["corrected_macro_f1"], res["macro_f1"], res["corrected_accuracy"]

    def scratch(train: ad.AnnData):
        schce.HCEClassifier.setup_anndata(train, labels_key=LABELS)
        model = schce.HCEClassifier(train, loss=loss)
        model.train(seed=seed, enable_progress_bar=False)
        return model

    out = {}
    t0 = time.perf_counter()
    base = scratch(source)
    out["3pv2 only"] = (*score(base), time.perf_counter() - t0)
    out["3pv2 only, all 5p"] = (*score(base, target), out["3pv2 only"][-1])
    with tempfile.TemporaryDirectory() as tmp:
        base.save(Path(tmp) / "base")
        for method, freeze in (("fine-tune", False), ("fine-tune head", True)):
            model = schce.HCEClassifier.load(Path(tmp) / "base")
            t0 = time.perf_counter()
            model.fine_tune(third, LABELS, freeze_encoder=freeze, seed=seed, enable_progress_bar=False)
            out[method] = (*score(model), time.perf_counter() - t0)
    t0 = time.perf_counter()
    out["scratch third"] = (*score(scratch(third.copy())), time.perf_counter() - t0)
    t0 = time.perf_counter()
    both = ad.concat([source, third], merge="same")
    out["scratch 3pv2+third"] = (*score(scratch(both)), time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loss", default="hce-aware", choices=["hce-aware", "hce", "ce"], help="the models' loss")
    args = parser.parse_args()
    if not ready():
        return
    adata = ad.read_h5ad(SYMPHONY)
    runs = [run_seed(adata, seed, args.loss) for seed in args.seeds]
    for method in METHODS:
        values = np.array([r[method] for r in runs])
        m, s = values.mean(axis=0), values.std(axis=0)
        print(
            f"3pv2 -> 5p {args.loss:9s} {method:19s} corrected macro F1 {m[0]:.3f} ± {s[0]:.3f} | "
            f"exact macro F1 {m[1]:.3f} ± {s[1]:.3f} | corrected accuracy {m[2]:.3f} ± {s[2]:.3f} | "
            f"{m[3]:.1f} s per run ({len(args.seeds)} seeds)",
            flush=True,
        )


if __name__ == "__main__":
    main()
