"""The HCE paper's ID and OOD rows from published checkpoints: macro F1 in the paper's convention and in schce's.

Given the scTab store (``merlin_cxg_2023_05_15_sf-log1p``: train/val/test parts, ``var.parquet``,
``categorical_lookup/``, ``cell_type_hierarchy/``) and published checkpoints, prints one row per checkpoint and test
set: ID is the store's test split (the paper's donor split), OOD each ``--ood`` h5ad (cells × genes, log-normalised
as the store or raw counts, an ``obs`` column of CL names or IDs). Columns: cells scored and dropped (truth not a
model label), macro F1 as the paper's evaluation code computes it (``convention="paper"`` for ID, ``"paper_ood"``
for OOD) and schce's own corrected macro F1 over every cell (``convention="schce"``).

``--synthetic DIR`` writes a small atlas in the published store layout (log1p values, donor split) and a linear, an
MLP and a TabNet checkpoint in the published format (random weights, the store's ``child_matrix.npy`` as
``child_lookup``), holds one dataset out as OOD, and runs on them: the end-to-end check where the real files are
absent. Its numbers mean nothing beyond that.

Run: ``python benchmarks/paper_reproduction.py --store STORE --checkpoints A.ckpt B.ckpt [--ood X.h5ad]`` or
``python benchmarks/paper_reproduction.py --synthetic /tmp/paper_repro``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np


def write_synthetic(root: Path, seed: int = 0) -> tuple[Path, list[Path], list[Path]]:
    """A store in the published layout, three published-format checkpoints and one OOD h5ad under ``root``."""
    import pandas as pd
    import scanpy as sc
    import torch

    from schce._simulate import simulate_atlas
    from schce.data import write_sctab_store
    from schce.nn import make_backbone

    root.mkdir(parents=True, exist_ok=True)
    adata = simulate_atlas(n_cells=3000, n_genes=300, n_cell_types=10, n_datasets=6, seed=seed, progress=False)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)  # the published store holds log1p(counts per 10,000)
    held_out = adata.obs["dataset_id"].astype(str) == sorted(adata.obs["dataset_id"].astype(str).unique())[-1]
    ood = adata[held_out].copy()
    ood.write_h5ad(root / "ood.h5ad")
    store = write_sctab_store(adata[~held_out].copy(), root / "store", split_key="donor_id", overwrite=True)
    genes = pd.read_parquet(store / "var.parquet")["feature_id"].astype(str).tolist()
    child = np.load(store / "cell_type_hierarchy" / "child_matrix.npy")
    k = len(child)
    sizes = {"linear": {}, "mlp": {"n_hidden": 32, "n_layers": 3}, "tabnet": {"n_d": 16, "n_a": 8, "n_steps": 1}}
    checkpoints = []
    for backbone, kwargs in sizes.items():
        torch.manual_seed(seed)
        net = make_backbone(backbone, len(genes), k, **kwargs).eval()
        state = {f"classifier.{key}": value for key, value in net.state_dict().items()}
        state.update(
            class_weights=torch.ones(k),
            child_lookup=torch.tensor(child.astype("i8")),
            child_lookup_transposed=torch.tensor(child.T.astype("f4")),
        )
        hparams = {"gene_dim": len(genes), "type_dim": k, "lr_scheduler_kwargs": {"step_size": 1, "gamma": 0.9}}
        if backbone == "tabnet":
            hparams.update(gamma=1.3, virtual_batch_size=256, momentum=0.02, mask_type="entmax")
        path = root / f"{backbone}.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
        checkpoints.append(path)
    return store, checkpoints, [root / "ood.h5ad"]


def evaluate(store: Path, checkpoints: list[Path], ood: list[Path], labels_key: str, batch_size: int) -> list[dict]:
    """One row per checkpoint and test set."""
    import anndata as ad

    import schce
    from schce.data import SCTabStoreDataModule

    dm = SCTabStoreDataModule(store, batch_size=batch_size, num_workers=0)
    ood_sets = {p.stem: ad.read_h5ad(p) for p in ood}
    rows = []
    for ckpt in checkpoints:
        model = schce.HCEClassifier.from_sctab_checkpoint(
            ckpt, store / "var.parquet", store / "categorical_lookup" / "cell_type.parquet"
        )
        tests = [("ID (test split)", "paper", {"datamodule": dm, "split": "test"})]
        tests += [(f"OOD {name}", "paper_ood", {"adata": a, "labels_key": labels_key}) for name, a in ood_sets.items()]
        for name, convention, data in tests:
            paper = model.evaluate(**data, convention=convention)
            ours = model.evaluate(**data, groupby=())
            rows.append(
                {
                    "checkpoint": ckpt.name,
                    "model": f"{model.loss.upper()} {model.backbone}",
                    "test set": name,
                    "scored": int(paper["n_scored"]),
                    "dropped": int(paper["n_dropped"]),
                    "paper macro F1": paper["macro_f1"],
                    "schce corrected macro F1": ours["corrected_macro_f1"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, help="the scTab store directory")
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=[], help="published .ckpt files")
    parser.add_argument("--ood", type=Path, nargs="*", default=[], help="h5ad files of new datasets")
    parser.add_argument("--labels-key", default="cell_type", help="obs column of the OOD files' true labels")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--synthetic", type=Path, help="write and use a synthetic store and checkpoints here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.synthetic is not None:
        store, checkpoints, ood = write_synthetic(args.synthetic)
        labels_key = "cell_type"
    elif args.store is not None and args.checkpoints:
        store, checkpoints, ood, labels_key = args.store, args.checkpoints, args.ood, args.labels_key
    else:
        parser.error("give --store and --checkpoints, or --synthetic DIR")
    rows = evaluate(store, checkpoints, ood, labels_key, args.batch_size)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return rows


if __name__ == "__main__":
    main()
