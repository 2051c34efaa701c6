"""GPU check: one epoch of each backbone with ``loss="hce-aware"`` from a synthetic compact store of ≥ 1 M cells.

Builds a compact scTab store of ``--n-cells`` training cells × 19,331 genes: a synthetic atlas of ``--base-cells``
cells (:func:`schce.datasets.simulate_atlas`) is written in the dense layout, converted to the compact one, and its
training parts are linked again and again under new part names until the training split holds ``--n-cells`` cells
(the same cells repeat; what is measured is reading, decoding and training, not learning). Then, for each backbone
(MLP, linear, TabNet), one epoch of store-backed training with the default ``loss="hce-aware"`` (masks from the
store's ``dataset_id`` codes) on one device, printing cells/s of the training epoch, peak GPU memory and the
fraction of the epoch the training loop waited for the loader. With two or more GPUs it then runs the MLP epoch
again with ``devices=2, strategy="ddp"``.

Run on a GPU machine (one command, under 10 minutes on one H200 at the defaults):
``python benchmarks/gpu_check.py [--n-cells 1048576] [--workers 8] [--store /tmp/schce_gpu_store]``
``--small`` runs the same path on a tiny store (200 genes, 8,192 cells) on the CPU, in about a minute.
``--batch-format dense`` trains from dense batches instead of CSR ones; ``--compression none`` builds (under
``<store>_none``) and reads a store whose parts are not zstd-compressed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl

BACKBONES = ("mlp", "linear", "tabnet")


def build_store(path: Path, n_cells: int, base_cells: int, n_genes: int, compression: str = "zstd") -> Path:
    """A compact store whose training split holds at least ``n_cells`` cells (built once; reused when present)."""
    import schce
    from schce.data import convert_sctab_store, write_sctab_store
    from schce.data.sctab._format import COMPACT_META, split_parts

    if (path / "done").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    atlas = schce.datasets.simulate_atlas(base_cells, n_genes=n_genes, n_datasets=16, n_donors=64, seed=0)
    dense = write_sctab_store(
        atlas, path / "dense", split_key="donor_id", validation_size=0.05, test_size=0.0, overwrite=True
    )
    del atlas
    compact = convert_sctab_store(dense, path / "compact", compression=compression, overwrite=True)
    for part in (dense / s for s in ("train", "val", "test")):
        for f in part.glob("*.parquet"):
            f.unlink()
    parts = split_parts(compact, "train")
    meta = json.loads((compact / COMPACT_META).read_text())
    n_base = meta["splits"]["train"]["n_cells"]
    copies = math.ceil(n_cells / n_base)
    k = len(parts)
    for _ in range(copies - 1):
        for p in parts:
            os.link(p, compact / "train" / f"part.{k}.parquet")
            k += 1
    for key in ("n_cells", "nnz"):
        meta["splits"]["train"][key] *= copies
    meta["splits"]["train"]["parts"] = k
    (compact / COMPACT_META).write_text(json.dumps(meta, indent=1))
    (path / "done").write_text(f"{n_base * copies}\n")
    print(f"store: {n_base * copies:,} training cells × {n_genes:,} genes in {time.perf_counter() - start:.0f} s")
    return path


class Timer(pl.Callback):
    """Training-epoch time, cells, and the time the loop spent waiting for batches."""

    def __init__(self):
        self.wait = self.epoch = 0.0
        self.cells = 0
        self._start = self._mark = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = self._mark = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.wait += time.perf_counter() - self._mark
        self.cells += len(batch["y"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch += time.perf_counter() - self._start


def run_one(store: Path, backbone: str, args, devices: int = 1) -> dict:
    import torch

    import schce
    from schce.data import SCTabStoreDataModule

    cuda = torch.cuda.is_available()
    dm = SCTabStoreDataModule(
        store / "compact", batch_size=args.batch_size, num_workers=args.workers, batch_format=args.batch_format
    )
    model = schce.HCEClassifier.from_sctab_store(dm.path, backbone=backbone)
    assert model.loss == "hce-aware"
    timer = Timer()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    kwargs = {"strategy": "ddp"} if devices > 1 else {}
    model.train(
        datamodule=dm,
        max_epochs=1,
        seed=0,
        enable_progress_bar=False,
        calibrate=False,
        accelerator="gpu" if cuda else "cpu",
        devices=devices,
        callbacks=[timer],
        **kwargs,
    )
    return {
        "backbone": backbone,
        "devices": devices,
        "cells": timer.cells,
        "cells_per_s": timer.cells / timer.epoch,
        "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "wait_fraction": timer.wait / timer.epoch,
    }


def _line(r: dict) -> str:
    gpu = "n/a (CPU)" if r["gpu_gib"] != r["gpu_gib"] else f"{r['gpu_gib']:.2f} GiB"
    return (
        f"{r['backbone']:<7} devices={r['devices']}  {r['cells']:>9,} cells (this rank)  {r['cells_per_s']:>9,.0f} "
        f"cells/s  peak GPU memory {gpu}  loader wait {r['wait_fraction']:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=1_048_576)
    parser.add_argument("--base-cells", type=int, default=16_384)
    parser.add_argument("--n-genes", type=int, default=19_331)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--store", type=Path, default=Path("/tmp/schce_gpu_store"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--small", action="store_true", help="tiny store (200 genes, 8,192 cells), CPU is fine")
    parser.add_argument(
        "--batch-format", default="auto", choices=("auto", "sparse", "dense"), help="the loader's batches (auto: CSR)"
    )
    parser.add_argument(
        "--compression", default="zstd", choices=("zstd", "none"), help="parquet codec of the store's parts"
    )
    parser.add_argument("--ddp-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.n_cells, args.base_cells, args.n_genes = 8192, 2048, 200
        args.batch_size, args.workers = 256, min(args.workers, 2)
        if args.store == parser.get_default("store"):
            args.store = Path("/tmp/schce_gpu_store_small")
    if args.compression != "zstd" and args.store == parser.get_default("store"):
        args.store = Path(f"{args.store}_{args.compression}")
    if args.ddp_only:  # Lightning re-runs this command for the other ranks
        r = run_one(args.store, "mlp", args, devices=2)
        print(_line(r), flush=True)
        return
    import torch

    from schce.data.sctab import _kernels

    store = build_store(args.store, args.n_cells, args.base_cells, args.n_genes, args.compression)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (no GPU: not a GPU figure)"
    print(f"device: {device}", flush=True)
    print(
        f"store {args.store} ({args.compression}), batches {args.batch_format}, {args.workers} workers, "
        f"compiled store decoding: {'numba' if _kernels.AVAILABLE else 'no (numpy passes)'}",
        flush=True,
    )
    for backbone in args.backbones:
        print(_line(run_one(store, backbone, args)), flush=True)
    if torch.cuda.device_count() >= 2:
        cmd = [sys.executable, __file__, "--ddp-only", "--store", str(args.store), "--workers", str(args.workers)]
        cmd += ["--batch-size", str(args.batch_size), "--batch-format", args.batch_format]
        cmd += ["--compression", args.compression] + (["--small"] if args.small else [])
        subprocess.run(cmd, check=True)
    else:
        print("DDP: fewer than two GPUs, not run")


if __name__ == "__main__":
    main()
