"""Read throughput and memory of the dense scTab store, the compact store and an in-memory AnnData.

Builds (once, cached under ``benchmarks/.cache/``) a synthetic atlas of ``--n-cells`` cells × 19,331 genes with
:func:`schce.datasets.simulate_atlas`, writes it in the published scTab layout and converts it to the compact one.
Each figure is measured in a fresh process, which reads one epoch of the training split in batches of 2048 with
2 DataLoader workers; memory is the peak RSS of the main process and the peak PSS of it with its workers (shared
pages split between them, so nothing counts twice). Prints one line per figure.

Run: ``.venv/bin/python benchmarks/loader_throughput.py [--n-cells 200000] [--train] [--readers]``
(``SCHCE_BENCH_CELLS`` also sets the size; ``--train`` adds one epoch of MLP training on the dense store,
``--train-compact`` on the compact store; ``--worker-sweep 0 1 2`` reads the compact store's training split with each
number of workers: cells/s and peak memory with the workers).

``--readers`` adds, from one further process on the same stores, the reader comparison of ``_readers.py`` (plain
pyarrow on the dense layout as the floor, schce on the dense layout, the compact layout as sparse batches, densified
into a reused buffer and as fresh dense batches, and a CSR probe written by the benchmark: median cells/s and cells
per CPU-second of ``--rounds`` interleaved rounds), the compact readers against the like-for-like probe alone (6 x
``--rounds`` rounds back to back, order rotated: the median and range of the per-round ratios), training cells/s per
backbone with the loader's share, and the first-layer matmul bound of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"
SCTAB_TRAIN = 15_200_000  # cells in scTab's training split (15.2 M)


def _memory() -> tuple[int, int]:
    """RSS of this process, and the PSS of it and its workers (shared pages split, so nothing counts twice)."""
    import psutil

    me = psutil.Process()
    rss, pss = me.memory_info().rss, 0
    for p in [me, *me.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                pss += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return rss, pss


class PeakRSS:
    """Samples memory every 100 ms: ``peak`` (main-process RSS) and ``peak_tree`` (PSS with the workers)."""

    def _sample(self):
        rss, pss = _memory()
        self.peak, self.peak_tree = max(self.peak, rss), max(self.peak_tree, pss)

    def __enter__(self):
        self.peak = self.peak_tree = 0
        self._sample()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self._sample()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare(n_cells: int, n_genes: int, n_jobs: int = 2) -> tuple[Path, Path]:
    """The cached dense and compact stores of this size (built when absent)."""
    import schce
    from schce.data import convert_sctab_store, write_sctab_store

    dense, compact = CACHE / f"atlas_{n_cells}x{n_genes}_dense", CACHE / f"atlas_{n_cells}x{n_genes}_compact"
    if not dense.exists():
        t = time.perf_counter()
        adata = schce.datasets.simulate_atlas(n_cells, n_genes=n_genes, seed=0)
        print(f"simulated {n_cells} cells in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        t = time.perf_counter()
        write_sctab_store(adata, dense, split_key="donor_id", labels_key="cell_type")
        print(f"wrote the dense store in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        del adata
    if not compact.exists():
        t = time.perf_counter()
        convert_sctab_store(dense, compact, n_jobs=n_jobs)
        took = time.perf_counter() - t
        rate = n_cells / took
        print(
            f"converted {n_cells:,} cells to compact in {took:.0f} s with {n_jobs} processes: {rate:,.0f} cells/s; "
            f"the 15.2 M-cell scTab training split would take {SCTAB_TRAIN / rate / 3600:.1f} h at this rate "
            f"(x {n_jobs}/n for n processes on as many free cores)",
            file=sys.stderr,
        )
    return dense, compact


def measure(kind: str, dense: Path, compact: Path, batch_size: int, workers: int) -> dict:
    if kind.startswith("compact-w"):  # the worker sweep: the compact store with that many workers
        kind, workers = "compact", int(kind.removeprefix("compact-w"))
    """One epoch over the training split; runs in its own process."""
    import torch

    from schce.data import SCTabStoreDataModule

    torch.set_num_threads(1)
    with PeakRSS() as rss:
        if kind == "anndata":
            from schce.data import read_sctab_store
            from schce.data._loader import make_loader

            adata = read_sctab_store(compact, "train", decode=False)
            codes = adata.obs["cell_type"].to_numpy()
            import numpy as np

            loader = make_loader(
                adata.X, np.arange(adata.n_obs), batch_size, codes, shuffle=True, seed=0, num_workers=workers
            )
        else:
            loader = SCTabStoreDataModule(
                dense if kind == "dense" else compact, batch_size=batch_size, num_workers=workers
            ).train_dataloader()
        t = time.perf_counter()
        n = 0
        for batch in loader:
            n += len(batch["y"])
        elapsed = time.perf_counter() - t
    return {"cells": n, "seconds": elapsed, "peak_rss": rss.peak, "peak_tree": rss.peak_tree}


def train(store: Path, batch_size: int, workers: int) -> dict:
    """One epoch of the default MLP on a store, gene scaling and validation included."""
    import schce
    from schce.data import SCTabStoreDataModule

    with PeakRSS() as rss:
        dm = SCTabStoreDataModule(store, batch_size=batch_size, num_workers=workers)
        model = schce.HCEClassifier.from_sctab_store(store, backbone="mlp")
        t = time.perf_counter()
        model.train(datamodule=dm, max_epochs=1, seed=0, calibrate=False, enable_progress_bar=False)
        elapsed = time.perf_counter() - t
    return {"cells": dm.n_cells("train"), "seconds": elapsed, "peak_rss": rss.peak, "peak_tree": rss.peak_tree}


def compare_readers(dense: Path, compact: Path, args) -> dict:
    """The reader comparison, training rates and matmul bound (in the measuring process)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _readers

    probe = _readers.write_probe(dense, CACHE / f"{dense.name}_csr_probe")
    out = {"readers": _readers.compare(dense, compact, probe, args.batch_size, args.rounds)}
    out["head_to_head"] = _readers.head_to_head(dense, compact, probe, args.batch_size, 6 * args.rounds)
    out["probe_bytes"] = _dir_size(probe)
    out["store_bytes"] = {p.name: _dir_size(p / "train") for p in (compact, _readers.uncompressed(dense, compact))}
    out["bound"], out["training"] = {}, {}
    for threads in args.threads:
        out["bound"][threads] = _readers.matmul_bound(args.batch_size, args.n_genes, 256, threads)
        backbones = ["linear", "mlp", "tabnet"] if threads == args.threads[-1] else ["mlp"]
        out["training"][threads] = _readers.training_rates(
            compact, args.batch_size, backbones, args.train_batches, threads
        )
    return out


def print_readers(out: dict, args) -> None:
    """Print the reader comparison as ratios to the pyarrow floor and the CSR probe."""
    readers = out["readers"]
    floor = readers["pyarrow floor (dense layout)"][0]
    probe = readers["CSR probe (uint16, fp16, .npy)"][0]
    fresh = readers["schce compact, dense (fresh)"][0]
    print(f"readers (one process, no workers, batch {args.batch_size}, median of {args.rounds} interleaved rounds):")
    for name, (rate, per_cpu) in readers.items():
        print(
            f"  {name}: {rate:,.0f} cells/s ({rate / floor:.2f}x floor, {rate / probe:.2f}x CSR probe, "
            f"{rate / fresh:.2f}x compact fresh dense), {per_cpu:,.0f} cells per CPU-second"
        )
    shuffled = readers["CSR probe, shuffled as schce"][0]
    ours = readers["schce compact, sparse"][0]
    print(
        f"  schce compact sparse vs the CSR probe read like for like (same batches): {ours / shuffled:.2f}x; "
        f"vs the probe read in store order: {ours / probe:.2f}x"
    )
    for name, ((wall, lo, hi), (cpu, cpu_lo, cpu_hi)) in out["head_to_head"].items():
        print(
            f"  like for like, alone and back to back ({6 * args.rounds} rounds, order rotated): {name} / CSR probe "
            f"shuffled as schce: {wall:.2f}x cells/s (range {lo:.2f}-{hi:.2f}), {cpu:.2f}x cells per CPU-second "
            f"(range {cpu_lo:.2f}-{cpu_hi:.2f})"
        )
    print(f"  CSR probe on disk: {out['probe_bytes'] / 2**30:.2f} GiB")
    for name, size in out["store_bytes"].items():
        print(f"  {name} training parts on disk: {size / 2**30:.2f} GiB")
    for threads, (gflops, bound) in out["bound"].items():
        print(
            f"first-layer matmul bound ({args.batch_size} x {args.n_genes} @ {args.n_genes} x 256, "
            f"{threads} threads): {gflops:.1f} GFLOP/s -> {bound:,.0f} training cells/s (the first layer's forward "
            "and backward matmuls: the product and the weight gradient; its input needs no gradient)"
        )
        for name, (rate, share) in out["training"][threads].items():
            print(
                f"training {name} (compact store, sparse batches, {threads} threads): {rate:,.0f} cells/s, "
                f"loader {100 * share:.0f}% of the time, {100 * rate / bound:.0f}% of the first-layer bound"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-cells", type=int, default=int(os.environ.get("SCHCE_BENCH_CELLS", 200_000)))
    parser.add_argument("--n-genes", type=int, default=19_331)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="also time one epoch of MLP training (dense store)")
    parser.add_argument("--train-compact", action="store_true", help="also time one MLP epoch on the compact store")
    parser.add_argument(
        "--worker-sweep", type=int, nargs="*", default=None, help="read the compact store with these worker counts"
    )
    parser.add_argument("--prepare-only", action="store_true", help="only build the cached stores")
    parser.add_argument("--readers", action="store_true", help="also compare the readers, training and matmul bound")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the reader comparison")
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[2], help="torch threads for training and the matmul bound (each)"
    )
    parser.add_argument("--train-batches", type=int, default=8, help="timed training batches per backbone")
    parser.add_argument(
        "--skip-epochs", action="store_true", help="skip the per-format read epochs with workers (not --train)"
    )
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dense, compact = prepare(args.n_cells, args.n_genes, args.workers)
    if args._measure:
        if args._measure in ("train", "train-compact"):
            out = train(dense if args._measure == "train" else compact, args.batch_size, args.workers)
        elif args._measure == "readers":
            out = compare_readers(dense, compact, args)
        else:
            out = measure(args._measure, dense, compact, args.batch_size, args.workers)
        print(json.dumps(out))
        return
    if args.prepare_only:
        return

    def child(kind: str) -> dict:
        cmd = [sys.executable, __file__, "--_measure", kind, "--n-cells", str(args.n_cells)]
        cmd += ["--n-genes", str(args.n_genes), "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
        cmd += ["--rounds", str(args.rounds), "--threads", *map(str, args.threads)]
        cmd += ["--train-batches", str(args.train_batches)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(res.stdout.strip().splitlines()[-1])

    gib = 2**30
    if args.readers:
        print_readers(child("readers"), args)
    for w in args.worker_sweep or []:
        r = child(f"compact-w{w}")
        print(
            f"compact store, {w} workers: {r['cells'] / r['seconds']:,.0f} cells/s ({r['cells']:,} cells), "
            f"peak {r['peak_tree'] / gib:.2f} GiB with workers ({r['peak_rss'] / gib:.2f} GiB main process)"
        )
    if args.train_compact:
        r = child("train-compact")
        print(
            f"one MLP training epoch (compact store, {args.workers} workers): "
            f"{r['cells'] / r['seconds']:,.0f} cells/s, {r['seconds']:.0f} s; "
            f"peak RSS {r['peak_rss'] / gib:.2f} GiB (main process), "
            f"{r['peak_tree'] / gib:.2f} GiB with workers"
        )
    if args.train:
        r = child("train")
        print(f"one MLP training epoch (dense store): {r['cells'] / r['seconds']:,.0f} cells/s, {r['seconds']:.0f} s")
        print(
            f"one MLP training epoch (dense store): peak RSS {r['peak_rss'] / gib:.2f} GiB (main process), "
            f"{r['peak_tree'] / gib:.2f} GiB with workers (check: < 4 GiB)"
        )
    if args.skip_epochs:
        return
    results = {}
    for kind, label in (("dense", "dense scTab store"), ("compact", "compact store"), ("anndata", "in-memory AnnData")):
        r = results[kind] = child(kind)
        print(
            f"{label}: {r['cells'] / r['seconds']:,.0f} cells/s ({r['cells']:,} cells, batch {args.batch_size}, "
            f"{args.workers} workers)"
        )
        print(
            f"{label}: peak RSS {r['peak_rss'] / gib:.2f} GiB (main process), "
            f"{r['peak_tree'] / gib:.2f} GiB with workers"
        )
    size_dense, size_compact = _dir_size(dense), _dir_size(compact)
    print(f"dense scTab store: {size_dense / gib:.2f} GiB on disk ({args.n_cells:,} cells x {args.n_genes:,} genes)")
    print(f"compact store: {size_compact / gib:.2f} GiB on disk")
    print(f"compact vs dense: {size_dense / size_compact:.1f}x smaller on disk")
    speed = (results["compact"]["cells"] / results["compact"]["seconds"]) / (
        results["dense"]["cells"] / results["dense"]["seconds"]
    )
    print(f"compact vs dense: {speed:.1f}x faster to read")


if __name__ == "__main__":
    main()
