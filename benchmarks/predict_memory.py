"""Peak memory of backed ``predict``: 200,000 cells × 2,000 genes with a 150-label model (issue 24).

Builds, in a temporary folder, a 150-label model (a small MLP trained for one epoch on a simulated atlas over the
Cell Ontology's leukocyte subtree) and a backed-size query: a sparse .h5ad of ``--cells`` cells over the model's
genes with about 7.5% non-zero counts. Each prediction runs in a fresh subprocess that opens the file backed, loads
the model, then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reads it back after ``predict``:
the figure is the peak resident memory above what was loaded before the call.

Prints one line: the peak with the default outputs (the full contract: probabilities, hierarchical scores,
embedding) and with ``hierarchical_scores="sparse"`` / ``"none"``; how much the peak grew from a quarter of the cells
against how much the stored outputs grew (memory that grows with the cells only by the outputs); the figure measured
before per-batch scoring; and the verdict against the 1 GiB threshold, e.g.::

    python benchmarks/predict_memory.py            # 200,000 cells
    python benchmarks/predict_memory.py --cells 50000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

THRESHOLD = 2**30  # bytes above the loaded data
N_GENES = 2_000
N_LABELS = 150
DENSITY = 0.075
# The default run measured before predict scored batch by batch (cells × terms built in float64 at once).
BEFORE_MIB = 2_757


def _peak_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); ``False`` when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _child(model_dir: str, h5ad: str, hierarchical_scores: str) -> None:
    """Run one backed prediction and print its memory as JSON (this process only)."""
    import anndata as ad

    import schce

    adata = ad.read_h5ad(h5ad, backed="r")
    model = schce.HCEClassifier.load(model_dir, accelerator="cpu")
    if not _peak_reset():
        print(json.dumps({"error": "cannot reset the peak-RSS mark (/proc/self/clear_refs)"}))
        return
    loaded = _status("VmRSS")
    start = time.perf_counter()
    options = {} if hierarchical_scores == "dense" else {"hierarchical_scores": hierarchical_scores}
    model.predict(adata, batch_size=4096, **options)
    seconds = time.perf_counter() - start
    outputs = sum(np.asarray(v).nbytes if not hasattr(v, "nnz") else v.data.nbytes for v in adata.obsm.values())
    n_terms = len(model.hierarchy.terms)
    print(
        json.dumps(
            {
                "loaded": loaded,
                "peak_above": _status("VmHWM") - loaded,
                "obsm_bytes": int(outputs),
                "n_terms": n_terms,
                "seconds": seconds,
            }
        )
    )


def _model(path: Path) -> None:
    """A 150-label MLP over ``N_GENES`` simulated genes, trained for one epoch; saved to ``path``."""
    import schce
    from schce._simulate import simulate_atlas

    atlas = simulate_atlas(
        n_cells=3 * N_LABELS * 4, n_genes=N_GENES, n_cell_types=N_LABELS, coarse_fraction=0.0, progress=False, seed=0
    )
    schce.HCEClassifier.setup_anndata(atlas, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(atlas, n_hidden=128, n_layers=2)
    model.train(max_epochs=1, enable_progress_bar=False, calibrate=False, accelerator="cpu")
    model.save(path)


def _genes(model_dir: Path) -> list[str]:
    import schce

    return list(schce.HCEClassifier.load(model_dir, accelerator="cpu").genes)


def _query(path: Path, genes: list[str], n_cells: int, seed: int = 0) -> None:
    """A sparse float32 CSR .h5ad of ``n_cells`` × the model's genes, ``DENSITY`` non-zero counts, written to disk."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, 10_000):
        rows = min(10_000, n_cells - start)
        mask = rng.random((rows, len(genes))) < DENSITY
        block = sp.csr_matrix(mask, dtype=np.float32)
        block.data = rng.poisson(2.0, block.nnz).astype(np.float32) + 1
        blocks.append(block)
    X = sp.vstack(blocks, format="csr")
    adata = ad.AnnData(
        X=X, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]), var=pd.DataFrame(index=pd.Index(genes))
    )
    adata.write_h5ad(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--modes", default="dense,sparse,none", help="hierarchical_scores choices to measure")
    parser.add_argument("--work", help="keep the model and the query in this folder (reused when present)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "H5AD", "SCORES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return
    if not sys.platform.startswith("linux"):
        print("skipped: the peak-RSS reset is Linux-specific")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.work or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model_dir = folder / "model"
        if not model_dir.exists():
            _model(model_dir)
        quarter = args.cells // 4
        for n in (args.cells, quarter):
            if not (folder / f"query_{n}.h5ad").exists():
                _query(folder / f"query_{n}.h5ad", _genes(model_dir), n)
        results = {m: _measure(model_dir, folder / f"query_{args.cells}.h5ad", m) for m in args.modes.split(",")}
        small = _measure(model_dir, folder / f"query_{quarter}.h5ad", "dense")
        full = results.get("dense") or _measure(model_dir, folder / f"query_{args.cells}.h5ad", "dense")
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    verdict = "ok" if full["peak_above"] < THRESHOLD else "ABOVE THRESHOLD"
    others = "; ".join(
        f"hierarchical_scores={m!r}: {mib(r['peak_above'])} ({mib(r['obsm_bytes'])} of obsm)"
        for m, r in results.items()
        if m != "dense"
    )
    print(
        f"backed predict, {args.cells:,} cells × {N_GENES:,} genes, {N_LABELS} labels ({full['n_terms']} terms): "
        f"peak {mib(full['peak_above'])} above the loaded data with the full outputs ({mib(full['obsm_bytes'])} of "
        f"obsm; {full['seconds']:.0f} s); {others + '; ' if others else ''}from {quarter:,} cells the peak grew "
        f"{mib(full['peak_above'] - small['peak_above'])} for {mib(full['obsm_bytes'] - small['obsm_bytes'])} more "
        f"obsm; before per-batch scoring (schce 058f489): {BEFORE_MIB:,} MiB (threshold {mib(THRESHOLD)}) {verdict}"
    )


def _measure(model_dir: Path, h5ad: Path, mode: str) -> dict:
    """One prediction in a fresh process: its memory figures."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run(
        [sys.executable, __file__, "--child", str(model_dir), str(h5ad), mode],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode or not lines:
        print(f"predict(hierarchical_scores={mode!r}) on {h5ad.name} failed:\n{run.stderr[-3000:]}")
        sys.exit(1)
    result = json.loads(lines[-1])
    if "error" in result:
        print(result["error"])
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
