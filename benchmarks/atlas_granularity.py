"""CE, the published HCE and hce-aware trained from a scTab store whose datasets annotate at different depths.

A synthetic atlas (:func:`schce.datasets.simulate_atlas`) of 15 cell types in which parents are types too: "T cell"
beside CD4 / CD8 beside naive / memory / regulatory, B cells, NK cells and monocytes. Of the 12 training datasets,
4 annotate only the top level ("T cell", "B cell", "monocyte", NK), 4 down to CD4 / CD8 (and CD14 monocytes), 4 at
the finest level; 3 held-out datasets, annotated at the finest level, are the OOD test split. The atlas is written
to a dense scTab store and every model trains store-backed (``SCTabStoreDataModule``): CE, HCE in its published
form (``loss="hce", hce_form="reference"``) and ``"hce-aware"`` (label meanings per ``dataset_id`` read from the
store's code columns), seeds 0 1 2. Prints OOD corrected and exact macro F1 per loss (mean ± sd over seeds).

It also measures the peak memory of computing the masks on a store of ``--mask-cells`` cells (2 M by default) that
holds only the ``cell_type`` and ``dataset_id`` code columns (164 labels, 300 datasets, each using a third of the
labels), in a fresh process: the mask step reads no other column, so expression would not change what it reads.

Run: ``.venv/bin/python benchmarks/atlas_granularity.py [--n-cells 30000] [--n-genes 2000] [--epochs 10]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

T, CD4, CD8 = "CL:0000084", "CL:0000624", "CL:0000625"
TYPES = [
    T,
    CD4,
    CD8,
    "CL:0000895",  # naive CD4
    "CL:0000897",  # memory CD4
    "CL:0000792",  # CD4 regulatory
    "CL:0000900",  # naive CD8
    "CL:0000909",  # memory CD8
    "CL:0000236",  # B cell
    "CL:0000788",  # naive B
    "CL:0000787",  # memory B
    "CL:0000623",  # NK
    "CL:0000576",  # monocyte
    "CL:0001054",  # CD14 monocyte
    "CL:0002396",  # CD16 monocyte
]
N_TRAIN_DATASETS, N_OOD = 12, 3
N_LABELS, N_SOURCES = 164, 300  # scTab's labels; datasets of the size of the census
LOSSES = {"ce": {"loss": "ce"}, "hce": {"loss": "hce", "hce_form": "reference"}, "hce-aware": {"loss": "hce-aware"}}


def _at_depth(onto, depth: int) -> dict[str, str]:
    """Each type's annotation by a dataset that annotates down to ``depth`` (0: top level) of the type tree."""
    within = {t: sorted((onto.ancestors(t) & set(TYPES)), key=lambda a: len(onto.ancestors(a))) for t in TYPES}
    return {t: (within[t] + [t])[min(depth, len(within[t]))] for t in TYPES}


def build_store(path: Path, n_cells: int, n_genes: int) -> Path:
    import schce
    from schce.data import write_sctab_store
    from schce.ontology import load_cell_ontology

    n_datasets = N_TRAIN_DATASETS + N_OOD
    atlas = schce.datasets.simulate_atlas(
        n_cells,
        n_genes=n_genes,
        n_datasets=n_datasets,
        n_donors=3 * n_datasets,
        cell_types=TYPES,
        coarse_fraction=0.0,
        library_size=1000.0,
        seed=0,
        progress=False,
    )
    onto = load_cell_ontology()
    datasets = sorted(atlas.obs["dataset_id"].unique())
    depth = {d: (2 if i >= N_TRAIN_DATASETS else i % 3) for i, d in enumerate(datasets)}
    maps = {k: _at_depth(onto, k) for k in range(3)}
    true = atlas.obs["true_cell_type_ontology_term_id"].astype(str).to_numpy()
    ds = atlas.obs["dataset_id"].astype(str).to_numpy()
    atlas.obs["cell_type_ontology_term_id"] = [maps[depth[d]][t] for d, t in zip(ds, true, strict=True)]
    rng = np.random.default_rng(0)
    ood = np.isin(ds, datasets[N_TRAIN_DATASETS:])
    atlas.obs["split"] = np.where(ood, "test", np.where(rng.random(len(ds)) < 0.1, "val", "train"))
    return write_sctab_store(atlas, path, labels_key="cell_type_ontology_term_id", split_key="split", overwrite=True)


def train_one(store: Path, loss: str, seed: int, epochs: int) -> dict:
    import schce
    from schce.data import SCTabStoreDataModule

    dm = SCTabStoreDataModule(store, batch_size=256, num_workers=0, seed=seed)
    model = schce.HCEClassifier.from_sctab_store(store, **LOSSES[loss])
    start = time.perf_counter()
    model.train(datamodule=dm, max_epochs=epochs, seed=seed, enable_progress_bar=False)
    result = model.evaluate(datamodule=dm, split="test")
    return {
        "corrected": result["corrected_macro_f1"],
        "exact": result["macro_f1"],
        "seconds": time.perf_counter() - start,
    }


def write_codes(n_cells: int, directory: Path) -> None:
    """A store holding only the ``cell_type`` and ``dataset_id`` codes (and their lookups) of ``n_cells`` cells."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_labels, n_sources, per_part = N_LABELS, N_SOURCES, 262_144
    rng = np.random.default_rng(0)
    (directory / "categorical_lookup").mkdir(parents=True)
    for column, n in (("cell_type", n_labels), ("dataset_id", n_sources)):
        pd.DataFrame({"idx": np.arange(n), "label": [f"{column}{i}" for i in range(n)]}).to_parquet(
            directory / "categorical_lookup" / f"{column}.parquet", index=False
        )
    for split, n in (("train", int(n_cells * 0.9)), ("val", n_cells - int(n_cells * 0.9))):
        (directory / split).mkdir()
        for k, start in enumerate(range(0, n, per_part)):
            m = min(per_part, n - start)
            source = np.sort(rng.integers(0, n_sources, m))  # grouped by dataset, as in real stores
            # Each dataset annotates its own random third of the labels.
            label = (source * 7 + rng.integers(0, n_labels // 3, m)) % n_labels
            table = pa.table({"cell_type": label, "dataset_id": source})
            pq.write_table(table, directory / split / f"part.{k}.parquet", row_group_size=1024)


def mask_memory(directory: Path) -> dict:
    """Peak RSS of label_usage + annotation_masks on a code-only store, measured in this (fresh) process."""
    import resource

    import psutil

    from schce.data.sctab._format import label_usage

    h = _random_hierarchy()
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    used = label_usage(directory, "dataset_id")
    masks, _ = h.annotation_masks(used)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the whole process, imports included
    return {
        "cells": int(sum(pq_rows(p) for s in ("train", "val") for p in (directory / s).glob("*.parquet"))),
        "masks": len(masks),
        "seconds": seconds,
        "rss_before": rss_before,
        "peak_rss": peak,
        "peak_above_before": max(0, peak - rss_before),
    }


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _random_hierarchy():
    from schce.hierarchy import Hierarchy

    rng = np.random.default_rng(0)
    parents = [None] + [int(rng.integers(0, i)) for i in range(1, N_LABELS)]  # a random tree of 164 labels
    labels = [f"L{i}" for i in range(N_LABELS)]
    return Hierarchy.from_edges([(labels[p], labels[i]) for i, p in enumerate(parents) if p is not None], labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=30_000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mask-cells", type=int, default=2_000_000)
    parser.add_argument("--_mask-memory", dest="mask_dir", help=argparse.SUPPRESS)
    parser.add_argument("--masks-only", action="store_true", help="only the mask-memory line")
    args = parser.parse_args()
    if args.mask_dir:
        print(json.dumps(mask_memory(Path(args.mask_dir))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        mem_dir = Path(tmp) / "codes"
        write_codes(args.mask_cells, mem_dir)
        out = subprocess.run(  # a fresh process: its peak RSS is the mask computation's (and the imports')
            [sys.executable, __file__, "--_mask-memory", str(mem_dir)], check=True, capture_output=True, text=True
        )
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"masks of a {mem['cells']:,}-cell store (cell_type + dataset_id codes only, 164 labels, 300 datasets): "
            f"{mem['masks']} masks in {mem['seconds']:.1f} s; peak RSS {mem['peak_rss'] / 2**30:.3f} GiB "
            f"of the process ({mem['peak_above_before'] / 2**30:.3f} GiB above its "
            f"{mem['rss_before'] / 2**30:.3f} GiB after the imports)"
        )
        if args.masks_only:
            return
        store = build_store(Path(tmp) / "store", args.n_cells, args.n_genes)
        rows = {loss: [train_one(store, loss, seed, args.epochs) for seed in args.seeds] for loss in LOSSES}
    print(f"OOD macro F1, {args.n_cells:,} cells × {args.n_genes} genes, {args.epochs} epochs, seeds {args.seeds}:")
    print("| loss | corrected | exact | s / run |")
    print("| --- | --- | --- | --- |")
    for loss, runs in rows.items():
        c, e = np.array([r["corrected"] for r in runs]), np.array([r["exact"] for r in runs])
        s = np.mean([r["seconds"] for r in runs])
        print(f"| `{loss}` | {c.mean():.3f} ± {c.std():.3f} | {e.mean():.3f} ± {e.std():.3f} | {s:.0f} |")


if __name__ == "__main__":
    main()
