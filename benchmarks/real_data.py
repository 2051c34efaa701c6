"""Real-data benchmark: schce HCE and CE with each backbone, a logistic-regression floor and the peers.

Methods are ``<loss>-<backbone>`` (losses ``hce-aware``, ``hce``, ``ce``; backbones ``mlp``, ``linear``,
``tabnet``), ``lr``, and the peers ``celltypist`` (CellTypist 1.7, defaults, majority voting off) and ``scanvi``
(scvi-tools: scVI then scANVI on the reference, the query mapped with ``load_query_data``); the peers need
``pip install -e ".[benchmark]"``. Tasks (data in ../shared/data/real; the script says so and exits when it is absent):

- symphony leave-one-batch-out (three 10x PBMC runs), the same with mixed-granularity training labels (the larger
  training batch calls CD4/CD8 T cells "T cell" and CD14/CD16 monocytes "monocyte"), and ``symphony-within``: half
  of those cells in every training batch coarsened (one source annotating the same kind at two depths);
- pancreas Wang → Xin and Xin → Wang on their shared genes (inputs already log-normalised);
- pbmc68k 5-fold stratified.

Prints one line per (task, method): mean ± sd over seeds of the hierarchy-corrected and exact macro F1 and accuracy,
the number of test cells called as a strict descendant of their true label (right by the hierarchy rule, wrong by
exact match; summed over folds, mean over seeds) and the wall time per run. Test labels absent from training count
as errors. All schce methods use the package defaults (one configuration for every task).

Levers are appended to a schce method with ``+``: ``+ens5`` is ``schce.HCEEnsemble(n_members=5)``, the mean of the
calibrated probabilities of 5 models trained with seeds ``seed, seed + 1000, ...`` (``ens2`` to ``ens9``);
``+query`` re-estimates the per-gene standardisation on the query cells (query-time adaptation; every member's, with
``+ensN``); ``+refit`` trains a second model on every training cell (no validation split, no calibration) for the
epoch count early stopping kept in the first (not with ``+ensN``). Variants of one method reuse its trained models (an
ensemble trains its own members), and each line's wall time counts the training of every model it uses. Each trained
schce model logs its kept epoch and epochs trained, and each training its seconds, to stderr (``# ...`` lines).

With ``--per-class``, each summary line is followed by one line per true label: its hierarchy-corrected F1 (mean
over the folds whose test set holds it, then mean ± sd over seeds) and its test cells per fold. Macro F1 weighs
every label alike, so these lines show which labels, and how few cells, move it.

Run: ``.venv/bin/python benchmarks/real_data.py [--seeds 0 1 2] [--tasks symphony pancreas] [--methods hce-mlp lr]
[--per-class]``; e.g. ``--methods hce-aware-mlp hce-aware-mlp+query hce-aware-mlp+ens5``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._peers import PEERS
from benchmarks._tasks import LABELS, SHARED_REAL, SYMPHONY, leave_one_batch_out, ready

from schce._benchmarking import per_label_summary

TASKS = ("symphony", "symphony-mixed", "symphony-within", "pancreas", "pbmc68k")
LOSSES = ("hce-aware", "hce", "ce")
METHODS = tuple(f"{loss}-{backbone}" for backbone in ("mlp", "linear", "tabnet") for loss in LOSSES) + ("lr", *PEERS)
# Levers on top of a schce method, appended with "+": an ensemble of N seeds (ens2 ... ens9), query-time
# standardisation.
LEVERS = tuple(f"ens{n}" for n in range(2, 10)) + ("query", "refit", "self")
# "+self": the query cells called with at least this calibrated confidence join the training cells, labelled with the
# call, and a second model is trained on both (self-training on the query; its true labels are never read).
SELF_CONFIDENCE = 0.9


def folds(task: str, seed: int) -> Iterator[tuple[ad.AnnData, ad.AnnData]]:
    """``(train, test)`` pairs; ``train.obs["training_label"]`` holds the training labels."""
    if task in ("symphony", "symphony-mixed", "symphony-within"):
        adata = ad.read_h5ad(SYMPHONY)
        within = 0.5 if task == "symphony-within" else 0.0
        for _, train, test in leave_one_batch_out(adata, task == "symphony-mixed", within_source=within, seed=seed):
            yield train, test
    elif task == "pancreas":
        wang = ad.read_h5ad(SHARED_REAL / "scClassify_pancreas_wang_lognorm_CL.h5ad")
        xin = ad.read_h5ad(SHARED_REAL / "scClassify_pancreas_xin_lognorm_CL.h5ad")
        shared = wang.var_names.intersection(xin.var_names)
        for train, test in ((wang, xin), (xin, wang)):
            train, test = train[:, shared].copy(), test[:, shared].copy()
            train.obs["training_label"] = train.obs[LABELS].astype(str).to_numpy()
            yield train, test
    elif task == "pbmc68k":
        from sklearn.model_selection import StratifiedKFold

        adata = ad.read_h5ad(SHARED_REAL / "pbmc68k_reduced_counts_CL.h5ad")
        labels = adata.obs[LABELS].astype(str).to_numpy()
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(labels, labels):
            train, test = adata[tr].copy(), adata[te].copy()
            train.obs["training_label"] = labels[tr]
            yield train, test
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def predict_labels(
    method: str, train: ad.AnnData, test: ad.AnnData, seed: int, model_kwargs: dict | None = None, train_kwargs=None
):
    """Predicted label per test cell, and the hierarchy of the training labels."""
    import schce

    # The batch is the annotation source that loss="hce-aware" reads label meanings from.
    batch_key = "batch" if "batch" in train.obs else None
    schce.HCEClassifier.setup_anndata(train, labels_key="training_label", batch_key=batch_key)
    if method in PEERS:
        from benchmarks._peers import PREDICT

        return PREDICT[method](train, test, seed), schce.HCEClassifier(train).hierarchy
    if method == "lr":
        import torch
        from sklearn.linear_model import LogisticRegression

        from schce.nn import normalize_counts

        hierarchy = schce.HCEClassifier(train).hierarchy

        def features(a: ad.AnnData) -> np.ndarray:
            # the same input as the models: counts are size-factor normalised and log1p'd, log data used as is
            X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X, dtype=np.float32)
            if np.array_equal(X, np.round(X)):
                X = normalize_counts(torch.as_tensor(X, dtype=torch.float32)).numpy()
            return X

        y = train.obs["training_label"].astype(str).to_numpy()
        clf = LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed).fit(features(train), y)
        return clf.predict(features(test)), hierarchy
    base, *levers = method.split("+")
    loss, backbone = base.rsplit("-", 1)
    n_models = next((int(lever[3:]) for lever in levers if lever.startswith("ens")), 1)
    if n_models == 1:
        model = trained(train, loss, backbone, seed, model_kwargs, train_kwargs)
        if "refit" in levers:
            model = refitted(model, train, loss, backbone, seed, model_kwargs, train_kwargs)
    else:
        # schce.HCEEnsemble: member i trained with seed + 1000 * i, the mean of their calibrated probabilities
        model = trained(train, loss, backbone, seed, model_kwargs, train_kwargs, n_members=n_models)
    if "self" in levers:
        model = self_trained(model, train, test, loss, backbone, seed, model_kwargs, train_kwargs, n_models)
    query = test.copy()
    with ExitStack() as stack:
        if "query" in levers:
            for member in getattr(model, "members", [model]):
                stack.enter_context(query_scaling(member, test))
        model.predict(query)
    # the library's own call (empty cells "unassigned")
    return query.obs["schce_prediction_ontology_term_id"].astype(str).to_numpy(), model.hierarchy


_TRAINED: dict[tuple, tuple[object, float]] = {}
# Training seconds of reused models, charged to the run that reuses them (each method's time is its own cost).
_CHARGED: list[float] = []


def trained(train: ad.AnnData, loss: str, backbone: str, seed: int, model_kwargs, train_kwargs, n_members: int = 1):
    """A trained schce model (an ``HCEEnsemble`` of ``n_members`` > 1), kept for the other levers on the same fold,
    seed and settings (one training each).
    """
    import schce

    labels = train.obs["training_label"].astype(str)
    key = (loss, backbone, seed, json.dumps([model_kwargs, train_kwargs], sort_keys=True), tuple(train.obs_names))
    key += (hash(tuple(labels)), n_members)
    if key in _TRAINED:
        model, seconds = _TRAINED[key]
        _CHARGED.append(seconds)
        return model
    t0 = time.perf_counter()
    kwargs = {"loss": loss, "backbone": backbone, **(model_kwargs or {})}
    if n_members == 1:
        model = schce.HCEClassifier(train, **kwargs)
    else:
        model = schce.HCEEnsemble(train, n_members=n_members, **kwargs)
    model.train(seed=seed, enable_progress_bar=False, **(train_kwargs or {}))
    _TRAINED[key] = model, time.perf_counter() - t0
    for member, member_seed in zip(getattr(model, "members", [model]), getattr(model, "seeds_", [seed]), strict=True):
        epochs = {k: len(v) for k, v in (member.history_ or {}).items()}
        print(
            f"# {loss}-{backbone} seed {member_seed}: kept epoch {member.best_epoch_}, epochs "
            f"{max(epochs.values(), default=0)}" + (f", {_TRAINED[key][1]:.1f} s" if n_members == 1 else ""),
            file=sys.stderr,
            flush=True,
        )
    if n_members > 1:
        print(f"# ensemble of {n_members}: {_TRAINED[key][1]:.1f} s", file=sys.stderr, flush=True)
    return model


def refitted(model, train: ad.AnnData, loss: str, backbone: str, seed: int, model_kwargs, train_kwargs):
    """A model trained on every cell (no validation split) for the epochs early stopping kept in ``model``."""
    epochs = (model.best_epoch_ or 0) + 1
    kwargs = {**(train_kwargs or {}), "validation_size": 0.0, "calibrate": False, "early_stopping": False}
    return trained(train, loss, backbone, seed, model_kwargs, {**kwargs, "max_epochs": epochs})


def self_trained(model, train, test, loss, backbone, seed, model_kwargs, train_kwargs, n_members: int = 1):
    """Self-training: a model trained on the training cells plus the query cells ``model`` calls with calibrated
    confidence ``>= SELF_CONFIDENCE``, labelled with those calls.
    """
    import schce

    calls = model.predict(test.copy(), inplace=False)
    keep = (calls["schce_confidence"].to_numpy() >= SELF_CONFIDENCE) & (calls["schce_confidence"].to_numpy() > 0)
    pseudo = test[keep].copy()
    pseudo.obs = pseudo.obs.drop(columns=[LABELS, "cell_type_cl_name"], errors="ignore")
    pseudo.obs["training_label"] = calls["schce_prediction_ontology_term_id"].astype(str).to_numpy()[keep]
    both = ad.concat([train, pseudo], join="inner", merge="same")
    both.obs_names_make_unique()
    batch_key = "batch" if "batch" in both.obs else None
    schce.HCEClassifier.setup_anndata(both, labels_key="training_label", batch_key=batch_key)
    print(f"# self-training: {keep.sum()} of {len(keep)} query cells added", file=sys.stderr, flush=True)
    return trained(both, loss, backbone, seed, model_kwargs, train_kwargs, n_members=n_members)


@contextmanager
def query_scaling(model, test: ad.AnnData) -> Iterator[None]:
    """Query-time adaptation: the model's per-gene standardisation re-estimated on the query cells themselves."""
    import torch

    from schce.nn import normalize_counts

    X = test[:, model.genes].X
    x = torch.as_tensor(X.toarray() if hasattr(X, "toarray") else np.asarray(X), dtype=torch.float32)
    if model.setup_state.normalize:
        x = normalize_counts(x)
    mean, std = x.mean(dim=0), x.std(dim=0, correction=0)
    std[std < 1e-6] = 1.0
    saved = model.module.input_mean.clone(), model.module.input_scale.clone()
    model.module.set_input_scaling(mean, std)
    try:
        yield
    finally:
        model.module.set_input_scaling(*saved)


def method_name(name: str) -> str:
    """A method of :data:`METHODS`; a schce method may append levers of :data:`LEVERS` (``hce-aware-mlp+ens5``)."""
    base, *levers = name.split("+")
    if base not in METHODS or (levers and base in ("lr", *PEERS)) or any(lever not in LEVERS for lever in levers):
        levers_help = "'+ensN', '+query', '+refit', '+self'"
        raise argparse.ArgumentTypeError(f"{name!r}: choose from {METHODS}, schce ones with {levers_help}")
    if "refit" in levers and any(lever.startswith("ens") for lever in levers):
        raise argparse.ArgumentTypeError(f"{name!r}: '+refit' refits one model; it does not combine with '+ensN'")
    return name


def per_class_lines(
    task: str, method: str, per_seed: list[dict[str, list[tuple[float, int]]]], names: dict[str, str]
) -> list[str]:
    """One line per true label: corrected F1 (fold mean, then mean ± sd over seeds) and test cells per fold."""
    table = per_label_summary(per_seed)
    table = table.loc[sorted(table.index, key=lambda t: names.get(t, t))]
    return [
        f"{task:15s} {method:15s}   {names.get(label, label)[:48]:48s} corrected F1 {row['mean']:.3f} ± "
        f"{row['sd']:.3f} | {row['cells']:.0f} test cells per fold"
        for label, row in table.iterrows()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        type=method_name,
        help=f"{', '.join(METHODS)}; a schce method may add levers: '+ens5' (5 seeds averaged), '+query' (query-time "
        "standardisation), '+refit' (refit on every cell), '+self' (self-training on the query)",
    )
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"dropout\": 0.3}'")
    parser.add_argument("--train-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"lr\": 1e-3}'")
    parser.add_argument("--per-class", action="store_true", help="also print every true label's corrected F1")
    args = parser.parse_args()
    if not ready():
        return
    from schce.metrics import classification_scores, per_class_table

    for task in args.tasks:
        _TRAINED.clear()
        for method in args.methods:
            per_seed, seconds, classes, names = [], [], [], {}
            for seed in args.seeds:
                runs, by_label = [], {}
                for train, test in folds(task, seed):
                    t0 = time.perf_counter()
                    pred, hierarchy = predict_labels(method, train, test, seed, args.model_kwargs, args.train_kwargs)
                    seconds.append(time.perf_counter() - t0 + sum(_CHARGED))
                    _CHARGED.clear()
                    # Test labels the model never saw count as errors (as in the reference numbers).
                    true = test.obs[LABELS].astype(str).to_numpy()
                    res = classification_scores(true, pred, hierarchy)
                    # Called a strict descendant of the truth: right by the hierarchy rule, wrong by exact match.
                    corrected = hierarchy.correct_predictions(pred, true)
                    below = int(((corrected == true) & (pred != true)).sum())
                    table = per_class_table(true, corrected)
                    for label, row in table.iterrows():
                        by_label.setdefault(label, []).append((row["f1"], row["support"]))
                    names.update(zip(true, test.obs["cell_type_cl_name"].astype(str), strict=True))
                    runs.append(
                        (res["corrected_macro_f1"], res["macro_f1"], res["corrected_accuracy"], res["accuracy"], below)
                    )
                # Scores average over folds; descendant calls add up over the folds' test cells.
                runs = np.asarray(runs)
                per_seed.append(np.r_[runs[:, :4].mean(axis=0), runs[:, 4].sum()])
                classes.append(by_label)
            m, s = np.mean(per_seed, axis=0), np.std(per_seed, axis=0)
            print(
                f"{task:15s} {method:15s} corrected macro F1 {m[0]:.3f} ± {s[0]:.3f} | exact macro F1 "
                f"{m[1]:.3f} ± {s[1]:.3f} | corrected accuracy {m[2]:.3f} ± {s[2]:.3f} | exact accuracy "
                f"{m[3]:.3f} ± {s[3]:.3f} | strict-descendant calls {m[4]:.0f} | "
                f"{np.mean(seconds):.1f} s per run ({len(args.seeds)} seeds)",
                flush=True,
            )
            if args.per_class:
                print("\n".join(per_class_lines(task, method, classes, names)), flush=True)


if __name__ == "__main__":
    main()
