"""The reader comparison of ``loader_throughput.py --readers``: one process, interleaved rounds, medians.

Readers of one epoch of the training split (batch ``--batch-size``, no workers, one torch thread):

- ``pyarrow floor``: plain pyarrow on the dense layout (row groups to a float32 matrix, sliced into batches);
- ``schce dense layout``: :class:`~schce.data.StoreDataset` on the dense store (dense batches);
- ``schce compact, sparse``: the compact store's CSR batches (the default);
- ``schce compact, uncompressed parts``: the same reader on the store converted with ``compression="none"``;
- ``schce compact, dense into buffer``: the same batches densified by :class:`~schce.nn.Densifier` (reused buffer);
- ``schce compact, dense (fresh)``: ``batch_format="dense"``, a new dense batch per batch (the previous default),
  and the same with the numpy passes (the previous version's rate, the baseline of the dense-batch target);
- ``schce compact, sparse (numpy loops)``: the same reader with numpy passes instead of the compiled loops
  (``data/sctab/_kernels.py``): the fallback without numba (each row group decoded whole, then the batch gathered),
  as a baseline in the same run;
- ``CSR probe``: written here: per part ``.npy`` shards of ``indptr`` (int64), ``indices`` (uint16) and ``values``
  (float16), read whole in store order and cut into CSR batches of int32 indices and float32 values;
- ``CSR probe, shuffled as schce``: the same shards read in the schce reader's order (row groups permuted, 8 at a
  time, rows shuffled across them): the same batches as the schce reader (checked), so the like-for-like peer.

Each reader's wall-clock and CPU time (this process) are taken per round; rounds interleave the readers so a
shared machine's load hits them alike, and the median round is reported. :func:`head_to_head` then times the compact
readers and the like-for-like probe alone, back to back with the order rotated each round, and reports each round's
ratio to the probe (median and range): the like-for-like figure.
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


def _probe_shuffled(probe: Path, batch_size: int, buffer_size: int = 8, seed: int = 0, epoch: int = 0):
    """The CSR probe read as :class:`~schce.data.StoreDataset` reads a store: the same batches.

    Units of 1024 rows (the store's row groups) in the epoch's permuted order, ``buffer_size`` units at a time,
    their rows shuffled with the reader's generator and gathered into CSR batches with the compiled gather of decoded
    blocks (the schce reader decodes its rows straight into the batch instead): what is left between this and the
    schce reader is the storage format (parquet + varint codec vs raw arrays).
    """
    import torch

    from schce.data.sctab._format import ROW_GROUP_SIZE
    from schce.data.sctab._kernels import gather_rows

    n_genes = int((probe / "done").read_text())
    shards = []
    for f in sorted(probe.glob("*_indptr.npy")):
        ind, val = (np.load(str(f).replace("_indptr", k), mmap_mode="r") for k in ("_indices", "_values"))
        shards.append((np.load(f), ind, val))
    units = [(k, g) for k, (ptr, _, _) in enumerate(shards) for g in range(0, len(ptr) - 1, ROW_GROUP_SIZE)]
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    rng = np.random.default_rng([seed, epoch, 0, 0])
    pending: list[tuple[tuple, np.ndarray]] = []

    def emit(ids, rows):
        lens = np.zeros(len(rows), dtype=np.int64)
        for k in np.unique(ids):
            lens[ids == k] = np.diff(pending[k][0][0])[rows[ids == k]]
        indptr = np.concatenate([[0], np.cumsum(lens)])
        indices, values = np.empty(indptr[-1], np.int32), np.empty(indptr[-1], np.float32)
        for k in np.unique(ids):
            dest = np.flatnonzero(ids == k)
            gather_rows(*pending[k][0], rows[dest], dest, indptr, indices, values)
        batch = {"x_indptr": torch.from_numpy(indptr), "x_indices": torch.from_numpy(indices)}
        batch.update(x_values=torch.from_numpy(values), x_shape=(len(rows), n_genes))
        return batch

    for start in range(0, len(order), buffer_size):
        for u in order[start : start + buffer_size]:
            k, g = units[u]
            ptr, ind, val = shards[k]
            ptr = ptr[g : g + ROW_GROUP_SIZE + 1]
            block = (ptr - ptr[0], np.asarray(ind[ptr[0] : ptr[-1]]), val[ptr[0] : ptr[-1]].astype(np.float32))
            pending.append((block, np.arange(len(ptr) - 1)))
        ids = np.concatenate([np.full(len(r), k) for k, (_, r) in enumerate(pending)])
        rows = np.concatenate([r for _, r in pending])
        perm = rng.permutation(len(rows))
        ids, rows = ids[perm], rows[perm]
        n_full = len(rows) // batch_size
        for b in range(n_full):
            yield emit(ids[b * batch_size : (b + 1) * batch_size], rows[b * batch_size : (b + 1) * batch_size])
        left_ids, left_rows = ids[n_full * batch_size :], rows[n_full * batch_size :]
        pending = [(pending[k][0], left_rows[left_ids == k]) for k in np.unique(left_ids)]
    if pending:
        ids = np.concatenate([np.full(len(r), k) for k, (_, r) in enumerate(pending)])
        yield emit(ids, np.concatenate([r for _, r in pending]))


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
    from schce.data.sctab import _kernels

    _kernels.AVAILABLE = _kernels.HAS_NUMBA  # the compiled loops (a numpy reader below switches them off)

    ds = StoreDataset(path, "train", batch_size, shuffle=True, seed=0, batch_format=batch_format)
    ds.next_epoch()
    return iter(ds)


def readers(dense: Path, compact: Path, probe: Path, batch_size: int) -> dict:
    """``name -> zero-argument function`` returning an iterator of batches over the training split."""
    from schce.nn import Densifier

    raw = uncompressed(dense, compact)

    densify = Densifier()

    def into_buffer():
        for batch in _store(compact, batch_size, "sparse"):
            densify(batch)
            yield batch

    def numpy_loops(batch_format="sparse"):  # the previous version's reader: numpy passes to decode and gather
        from schce.data.sctab import _kernels

        batches = _store(compact, batch_size, batch_format)
        _kernels.AVAILABLE = False
        try:
            yield from batches
        finally:
            _kernels.AVAILABLE = _kernels.HAS_NUMBA

    return {
        "pyarrow floor (dense layout)": lambda: _pyarrow(dense, batch_size),
        "schce dense layout": lambda: _store(dense, batch_size, "dense"),
        "schce compact, sparse": lambda: _store(compact, batch_size, "sparse"),
        "schce compact, sparse (numpy loops)": numpy_loops,
        "schce compact, uncompressed parts, sparse": lambda: _store(raw, batch_size, "sparse"),
        "schce compact, dense into buffer": into_buffer,
        "schce compact, dense (fresh)": lambda: _store(compact, batch_size, "dense"),
        "schce compact, dense (fresh, numpy loops)": lambda: numpy_loops("dense"),
        "CSR probe (uint16, fp16, .npy)": lambda: _probe(probe, batch_size),
        "CSR probe, shuffled as schce": lambda: _probe_shuffled(probe, batch_size),
    }


def uncompressed(dense: Path, compact: Path) -> Path:
    """The compact store converted with ``compression="none"`` (built once beside the other)."""
    from schce.data import convert_sctab_store

    raw = compact.with_name(compact.name + "_uncompressed")
    if not raw.exists():
        convert_sctab_store(dense, raw, compression="none", n_jobs=2)
    return raw


def _rows(batch: dict) -> int:
    return int(batch["x_shape"][0]) if "x_shape" in batch else len(batch["x"])


def check_same_batches(ours, probe, n: int = 2) -> None:
    """The first ``n`` batches of two sparse readers hold the same cells in the same order (row lengths and sums).

    The compact store keeps a cell's genes in its part's gene order, the probe in gene order: rows are compared as
    sets through their lengths and value sums (the probe's values are float16, so the sums agree to 1e-3).
    """
    import torch

    for _, a, b in zip(range(n), ours, probe, strict=False):
        assert torch.equal(a["x_indptr"], b["x_indptr"]), "the probe's batches are not the schce reader's"
        sums = [torch.zeros(a["x_shape"][0], dtype=torch.float64) for _ in range(2)]
        for out, batch in zip(sums, (a, b), strict=True):
            rows = torch.repeat_interleave(torch.arange(batch["x_shape"][0]), torch.diff(batch["x_indptr"]))
            out.index_add_(0, rows, batch["x_values"].double())
        torch.testing.assert_close(sums[0], sums[1], rtol=1e-3, atol=0)


def compare(dense: Path, compact: Path, probe: Path, batch_size: int, rounds: int) -> dict:
    """Median ``(cells/s, cells per CPU-second)`` of every reader over ``rounds`` interleaved rounds."""
    import torch

    torch.set_num_threads(1)
    funcs = readers(dense, compact, probe, batch_size)
    check_same_batches(funcs["schce compact, sparse"](), funcs["CSR probe, shuffled as schce"]())
    check_same_batches(funcs["schce compact, sparse"](), funcs["schce compact, uncompressed parts, sparse"]())
    timings: dict[str, list[tuple[float, float]]] = {k: [] for k in funcs}
    for _ in range(rounds):
        for name, make in funcs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            n = sum(_rows(b) for b in make())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            timings[name].append((n / wall, n / max(cpu, 1e-9)))
    return {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in timings.items()}


#: The like-for-like trio of :func:`head_to_head`: the probe last, as the reference.
PAIRED = ("schce compact, sparse", "schce compact, uncompressed parts, sparse", "CSR probe, shuffled as schce")


def head_to_head(dense: Path, compact: Path, probe: Path, batch_size: int, rounds: int) -> dict:
    """The compact readers and the like-for-like probe alone, back to back, the order rotated every round.

    In the interleaved rounds of :func:`compare` each reader follows another one (the dense readers allocate
    158 MB batches, the probe in store order the probe's sizes), which leaves the allocator and the caches in
    different states for the two like-for-like readers. Here only these readers alternate, each first in turn, and
    every round gives each reader's rate over the probe's of the same round: ``name -> (median, min, max)`` of
    those ratios, in cells/s and in cells per CPU-second.
    """
    import torch

    torch.set_num_threads(1)
    funcs = readers(dense, compact, probe, batch_size)
    ratios: dict[str, list[tuple[float, float]]] = {k: [] for k in PAIRED[:-1]}
    for r in range(rounds):
        rates = {}
        for name in PAIRED[r % len(PAIRED) :] + PAIRED[: r % len(PAIRED)]:
            wall, cpu = time.perf_counter(), time.process_time()
            n = sum(_rows(b) for b in funcs[name]())
            rates[name] = (n / (time.perf_counter() - wall), n / max(time.process_time() - cpu, 1e-9))
        ref = rates[PAIRED[-1]]
        for name in ratios:
            ratios[name].append((rates[name][0] / ref[0], rates[name][1] / ref[1]))
    out = {}
    for name, v in ratios.items():
        wall, cpu = [w for w, _ in v], [c for _, c in v]
        out[name] = [(statistics.median(x), min(x), max(x)) for x in (wall, cpu)]
    return out


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

    A plain step (densify into the buffer, in-place preprocessing and input dropout, forward, HCE loss, backward,
    the plan's AdamW) after one warm-up batch; the loader time is the time spent waiting for the next batch (no
    workers: all of its decoding). ``"mlp (previous step)"`` is the MLP with the previous version's step (torch's
    default CPU AdamW, out-of-place input dropout), measured in the same run as the baseline.
    """
    import torch

    from schce.train._plan import adamw

    torch.set_num_threads(threads)
    out = {}
    for name in backbones:
        out[name] = _train_rate(compact, batch_size, name, n_batches, adamw)
        if name == "mlp":
            out["mlp (previous step)"] = _train_rate(compact, batch_size, name, n_batches, torch.optim.AdamW, False)
    return out


def _train_rate(compact: Path, batch_size: int, name: str, n_batches: int, optimizer, inplace_dropout=True):
    import torch

    import schce
    from schce.losses import hierarchical_cross_entropy
    from schce.nn import Densifier

    torch.manual_seed(0)
    model = schce.HCEClassifier.from_sctab_store(compact, backbone=name)
    module = model.module.train()
    if not inplace_dropout:
        module.classifier.embeds_inplace = False
    if model.standardize:  # the preprocessing of training (values of the scaling do not change its cost)
        module.set_input_scaling(torch.zeros(len(model.genes)), torch.ones(len(model.genes)))
    R = torch.as_tensor(model.hierarchy.R, dtype=torch.float32)
    opt = optimizer(module.parameters(), lr=1e-3, weight_decay=0.01)
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
    return cells / (waits + steps), waits / (waits + steps)
