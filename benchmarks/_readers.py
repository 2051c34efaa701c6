"""The reader comparison of ``loader_throughput.py --readers``: one process, interleaved rounds, medians.

Readers of one epoch of the training split (batch ``--batch-size``, no workers, one torch thread):

- ``pyarrow floor``: plain pyarrow on the dense layout (row groups to a float32 matrix, sliced into batches);
- ``schce dense layout``: :class:`~schce.data.StoreDataset` on the dense store (dense batches);
- ``schce compact, sparse``: the compact store's CSR batches (the default);
- ``schce compact, dense into buffer``: the same batches densified by :class:`~schce.nn.Densifier` (reused buffer);
- ``schce compact, dense (fresh)``: ``batch_format="dense"``, a new dense batch per batch (the previous default);
- ``CSR probe``: written here: per part ``.npy`` shards of ``indptr`` (int64), ``indices`` (uint16) and ``values``
  (float16), read whole and cut into CSR batches of int32 indices and float32 values.

Each reader's wall-clock and CPU time (this process) are taken per round; rounds interleave the readers so a
shared machine's load hits them alike, and the median round is reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


def write_probe(dense: Path, out: Path) -> Path:
    """CSR ``.npy`` shards of the dense store's training parts (built once)."""
    import pyarrow.parquet as pq

    from schce.data.sctab._format import _dense_values, split_parts

    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    n_genes = None
    for k, part in enumerate(split_parts(dense, "train")):
        pf = pq.ParquetFile(part)
        n_genes = len(pf.read_row_group(0, columns=["X"]).column("X")[0])
        indptr, indices, values = [np.zeros(1, np.int64)], [], []
        for g in range(pf.num_row_groups):
            x = _dense_values(pf.read_row_group(g, columns=["X"]), n_genes)
            rows, cols = np.nonzero(x)
            indptr.append(indptr[-1][-1] + np.cumsum(np.bincount(rows, minlength=len(x))))
            indices.append(cols.astype(np.uint16))
            values.append(x[rows, cols].astype(np.float16))
        np.save(out / f"{k:04d}_indptr.npy", np.concatenate(indptr))
        np.save(out / f"{k:04d}_indices.npy", np.concatenate(indices))
        np.save(out / f"{k:04d}_values.npy", np.concatenate(values))
    (out / "done").write_text(str(n_genes))
    return out


def _probe(probe: Path, batch_size: int):
    import torch

    from schce.nn._batch import csr_batch

    n_genes = int((probe / "done").read_text())
    for f in sorted(probe.glob("*_indptr.npy")):
        indptr = np.load(f)
        indices = np.load(str(f).replace("_indptr", "_indices"))
        values = np.load(str(f).replace("_indptr", "_values"))
        for s in range(0, len(indptr) - 1, batch_size):
            ptr = indptr[s : s + batch_size + 1]
            lo, hi = ptr[0], ptr[-1]
            batch = csr_batch(ptr - lo, indices[lo:hi], values[lo:hi], n_genes)
            batch["y"] = torch.zeros(len(ptr) - 1, dtype=torch.int64)
            yield batch


def _pyarrow(dense: Path, batch_size: int):
    import pyarrow.parquet as pq
    import torch

    from schce.data.sctab._format import split_parts

    for part in split_parts(dense, "train"):
        pf = pq.ParquetFile(part)
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=["X"]).column("X").combine_chunks()
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            for s in range(0, len(x), batch_size):
                yield {"x": torch.from_numpy(x[s : s + batch_size])}


def _store(path: Path, batch_size: int, batch_format: str):
    from schce.data import StoreDataset

    ds = StoreDataset(path, "train", batch_size, shuffle=True, seed=0, batch_format=batch_format)
    ds.next_epoch()
    return iter(ds)


def readers(dense: Path, compact: Path, probe: Path, batch_size: int) -> dict:
    """``name -> zero-argument function`` returning an iterator of batches over the training split."""
    from schce.nn import Densifier

    densify = Densifier()

    def into_buffer():
        for batch in _store(compact, batch_size, "sparse"):
            densify(batch)
            yield batch

    return {
        "pyarrow floor (dense layout)": lambda: _pyarrow(dense, batch_size),
        "schce dense layout": lambda: _store(dense, batch_size, "dense"),
        "schce compact, sparse": lambda: _store(compact, batch_size, "sparse"),
        "schce compact, dense into buffer": into_buffer,
        "schce compact, dense (fresh)": lambda: _store(compact, batch_size, "dense"),
        "CSR probe (uint16, fp16, .npy)": lambda: _probe(probe, batch_size),
    }


def _rows(batch: dict) -> int:
    return int(batch["x_shape"][0]) if "x_shape" in batch else len(batch["x"])


def compare(dense: Path, compact: Path, probe: Path, batch_size: int, rounds: int) -> dict:
    """Median ``(cells/s, cells per CPU-second)`` of every reader over ``rounds`` interleaved rounds."""
    import torch

    torch.set_num_threads(1)
    funcs = readers(dense, compact, probe, batch_size)
    timings: dict[str, list[tuple[float, float]]] = {k: [] for k in funcs}
    for _ in range(rounds):
        for name, make in funcs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            n = sum(_rows(b) for b in make())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            timings[name].append((n / wall, n / max(cpu, 1e-9)))
    return {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in timings.items()}


def matmul_bound(batch_size: int, n_genes: int, n_hidden: int, threads: int) -> tuple[float, float]:
    """GFLOP/s of a ``(batch, genes) @ (genes, hidden)`` float32 matmul and the training cells/s it bounds.

    A training step needs that product forward and its transpose for the weight gradient (the input needs none).
    """
    import torch

    torch.set_num_threads(threads)
    x, w = torch.rand(batch_size, n_genes), torch.rand(n_genes, n_hidden)
    torch.mm(x, w)
    best = min(_timed(lambda: torch.mm(x, w)) for _ in range(5))
    gflops = 2 * batch_size * n_genes * n_hidden / best / 1e9
    return gflops, batch_size / (2 * best)


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def training_rates(compact: Path, batch_size: int, backbones: list[str], n_batches: int, threads: int) -> dict:
    """Training cells/s and the loader's share of the time, per backbone, over the compact store's sparse batches.

    A plain step (densify into the buffer, in-place preprocessing, forward, HCE loss, backward, AdamW) after one
    warm-up batch; the loader time is the time spent waiting for the next batch (no workers: all of its decoding).
    """
    import torch

    import schce
    from schce.losses import hierarchical_cross_entropy
    from schce.nn import Densifier

    torch.set_num_threads(threads)
    out = {}
    for name in backbones:
        torch.manual_seed(0)
        model = schce.HCEClassifier.from_sctab_store(compact, backbone=name)
        module = model.module.train()
        if model.standardize:  # the preprocessing of training (values of the scaling do not change its cost)
            module.set_input_scaling(torch.zeros(len(model.genes)), torch.ones(len(model.genes)))
        R = torch.as_tensor(model.hierarchy.R, dtype=torch.float32)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        densify, loader = Densifier(), _store(compact, batch_size, "sparse")
        waits, steps, cells = 0.0, 0.0, 0
        for k in range(n_batches + 1):
            t = time.perf_counter()
            batch = next(loader, None)
            if batch is None:
                break
            wait = time.perf_counter() - t
            t = time.perf_counter()
            logits, _ = module(densify(batch), inplace=True)
            loss = hierarchical_cross_entropy(logits, batch["y"], R)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if k:  # the first batch warms up
                waits, steps, cells = waits + wait, steps + time.perf_counter() - t, cells + len(batch["y"])
        out[name] = (cells / (waits + steps), waits / (waits + steps))
    return out
