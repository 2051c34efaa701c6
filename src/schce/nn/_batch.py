"""Batches whose expression is sparse (CSR parts) and their densification, on the device, into a reused buffer.

A sparse batch holds ``"x_indptr"`` (int64, ``B + 1``), ``"x_indices"`` (int32 gene columns), ``"x_values"``
(float32) and ``"x_shape"`` (``(B, n_genes)``, plain ints) instead of ``"x"``; every other key (``"y"``, ``"idx"``,
``"batch"``, ``"target"``) is unchanged. These are plain tensors, so such batches pass through a ``DataLoader``
(``batch_size=None``, with workers, pinned memory) and Lightning's transfer to the device as dense ones do.
"""

from __future__ import annotations

import numpy as np
import torch

from schce.nn import _kernels

#: Keys of a sparse batch's expression.
SPARSE_KEYS = ("x_indptr", "x_indices", "x_values", "x_shape")
#: What loaders yield: ``"sparse"`` (CSR parts), ``"dense"`` (``"x"``) or ``"auto"`` (sparse where it is faster).
BATCH_FORMATS = ("auto", "sparse", "dense")


def check_batch_format(batch_format: str) -> str:
    """``batch_format`` itself, or a clear error."""
    if batch_format not in BATCH_FORMATS:
        raise ValueError(f"batch_format must be one of {BATCH_FORMATS}, got {batch_format!r}.")
    return batch_format


def csr_batch(indptr, indices, values, n_genes: int) -> dict:
    """The expression keys of a sparse batch from CSR parts, numpy arrays or tensors.

    Parts already of the format's dtypes are used as they are (a tensor keeps its storage, e.g. shared memory);
    others are copied to them.
    """
    indptr = _part(indptr, torch.int64)
    return {
        "x_indptr": indptr,
        "x_indices": _part(indices, torch.int32),
        "x_values": _part(values, torch.float32),
        "x_shape": (len(indptr) - 1, int(n_genes)),
    }


def _part(x, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as it is when of ``dtype``, else converted; a numpy array through numpy (as it was before tensors)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.asarray(x, dtype=str(dtype).removeprefix("torch.")))


def is_sparse(batch: dict) -> bool:
    """Whether a batch holds its expression as CSR parts."""
    return "x" not in batch and "x_values" in batch


def batch_rows(batch: dict) -> int:
    """Cells in a batch, dense or sparse."""
    return int(batch["x_shape"][0]) if is_sparse(batch) else len(batch["x"])


def csr_rows(indptr: torch.Tensor, n: int, nnz: int | None = None) -> torch.Tensor:
    """The row (int64) of every stored value (``indptr`` expanded), on ``indptr``'s device.

    A cumulative sum of row-start marks: on the CPU several times faster than ``repeat_interleave``, and ``nnz``
    (the values' length) spares a device sync.
    """
    nnz = int(indptr[-1]) if nnz is None else int(nnz)
    marks = torch.zeros(nnz + 1, dtype=torch.int64, device=indptr.device)
    if n > 1:  # every row after the first adds one from its first value on (empty rows add at the same place)
        marks.index_add_(0, indptr[1:n].long(), torch.ones(n - 1, dtype=torch.int64, device=indptr.device))
    return marks[:nnz].cumsum_(0) if nnz else marks[:0]


class Densifier:
    """Builds the dense ``(B, n_genes)`` float32 input of a batch, reusing one buffer per device.

    A dense batch's ``"x"`` is returned as it is (moved to ``device``). A sparse batch is copied to ``device``
    (non-blocking: pinned batches overlap the copy with compute), then scattered into a buffer that is zeroed, not
    reallocated, for every batch. The returned tensor is that buffer: it is valid until the next call, which is
    what a training or prediction step needs (the step ends before the next batch is densified).
    """

    def __init__(self):
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def __call__(self, batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
        if not is_sparse(batch):
            x = batch["x"]
            return x if device is None else x.to(device, non_blocking=True)
        n, n_genes = (int(v) for v in batch["x_shape"])
        device = torch.device(device) if device is not None else batch["x_values"].device
        indptr, indices, values = (batch[k].to(device, non_blocking=True) for k in SPARSE_KEYS[:3])
        out = self.buffer(n, n_genes, device)
        if device.type == "cpu":
            scatter = _kernels.scatter() if values.dtype in (torch.float32, torch.float64) else None
            if scatter is not None:  # one compiled pass, no index arrays: half numpy's time
                if not scatter(indptr.numpy(), indices.numpy(), values.numpy(), out.numpy()):
                    raise IndexError(f"A sparse batch holds gene indices outside [0, {n_genes}) or a bad indptr.")
                return out
            # numpy's repeat and scatter: a third of the CPU time of the torch ops here
            flat = np.repeat(np.arange(n, dtype=np.int64) * n_genes, np.diff(indptr.numpy()))
            flat += indices.numpy()
            out.numpy().reshape(-1)[flat] = values.numpy()
            return out
        flat = csr_rows(indptr, n, values.numel()).mul_(n_genes).add_(indices)
        out.view(-1).index_put_((flat,), values.to(torch.float32))
        return out

    def buffer(self, n: int, n_genes: int, device: torch.device) -> torch.Tensor:
        """A zeroed ``(n, n_genes)`` float32 view of this device's buffer (grown when too small)."""
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < n * n_genes:
            buf = torch.empty(n * n_genes, dtype=torch.float32, device=device)
            self._buffers[device] = buf
        out = buf[: n * n_genes].view(n, n_genes)
        out.zero_()
        return out

    def release(self) -> None:
        """Drop the buffers (after a pass)."""
        self._buffers.clear()


def densify(batch: dict, device: torch.device | str | None = None) -> torch.Tensor:
    """A batch's dense input in fresh memory (for callers that keep it); see :class:`Densifier` for the fast path."""
    return Densifier()(batch, device)
