"""The classifier module: in-graph normalisation followed by a backbone."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from schce.nn._batch import csr_rows, is_sparse

TARGET_SUM = 1e4
# Standardised inputs are clipped here, as scanpy's ``sc.pp.scale(max_value=10)`` does.
CLIP = 10.0


def normalize_counts(x: torch.Tensor, target_sum: float = TARGET_SUM) -> torch.Tensor:
    """Size-factor normalise counts to ``target_sum`` per cell, then ``log1p``.

    This is the one normalisation of schce; it runs inside the module so it happens on the accelerator.
    Cells with no counts stay all-zero.

    Parameters
    ----------
    x
        ``(B, n_genes)`` non-negative counts.
    target_sum
        Total per cell after scaling.
    """
    total = x.sum(dim=1, keepdim=True)
    return torch.log1p(x * (target_sum / total.clamp_min(1e-12)))


def _csr_moments(batch: dict, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-gene float64 sums and sums of squares of a sparse batch, from its stored values only (zeros add 0)."""
    n, n_genes = (int(v) for v in batch["x_shape"])
    values, genes = batch["x_values"].float(), batch["x_indices"].long()
    if normalize:
        rows = csr_rows(batch["x_indptr"], n, values.numel())
        total = torch.zeros(n, dtype=torch.float32).index_add_(0, rows, values)
        values = torch.log1p(values * (TARGET_SUM / total.clamp_min(1e-12))[rows])
    values = values.double()
    total = torch.zeros(n_genes, dtype=torch.float64).index_add_(0, genes, values)
    total_sq = torch.zeros(n_genes, dtype=torch.float64).index_add_(0, genes, values.square())
    return total, total_sq, n


def gene_moments(
    batches: Iterable[dict], normalize: bool, max_cells: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-gene mean and standard deviation of the model's inputs, streamed over batches.

    Parameters
    ----------
    batches
        Batches with an ``"x"`` tensor ``(B, n_genes)`` or sparse ones (:mod:`schce.nn._batch`), as the training
        loaders yield them; sparse batches are summed from their stored values alone (one pass, no dense batch).
    normalize
        Whether ``x`` holds counts to pass through :func:`normalize_counts` first.
    max_cells
        Stop after this many cells (an estimate from the first batches of a shuffled atlas loader).

    Returns
    -------
    ``(mean, std, n_cells)``; genes that do not vary get ``std = 1`` so they pass through unscaled.
    """
    n, total, total_sq = 0, 0.0, 0.0
    for batch in batches:
        # float64 sums (the batch itself stays float32, its size in memory): one pass over millions of cells must
        # not lose the variance to cancellation.
        if is_sparse(batch):
            part, part_sq, rows = _csr_moments(batch, normalize)
        else:
            x = batch["x"].float()
            if normalize:
                x = normalize_counts(x)
            part, part_sq, rows = x.sum(0, dtype=torch.float64), x.square().sum(0, dtype=torch.float64), len(x)
        total, total_sq, n = total + part, total_sq + part_sq, n + rows
        if max_cells is not None and n >= max_cells:
            break
    if n == 0:
        raise ValueError("No cells to compute the gene scaling from.")
    mean = total / n
    std = (total_sq / n - mean**2).clamp_min(0).sqrt()
    std[std < 1e-6] = 1.0
    return mean.float(), std.float(), n


class HCEModule(nn.Module):
    """Normalisation, optional per-gene standardisation, and a backbone.

    Standardisation (:meth:`set_input_scaling`) is set by :meth:`schce.HCEClassifier.train` from the training cells;
    its ``input_mean`` / ``input_scale`` buffers exist only once set, so scTab state dicts load unchanged.

    Parameters
    ----------
    classifier
        A backbone with ``embed`` and ``classify`` (see :mod:`schce.nn`). Stored as ``classifier`` so the
        state dict uses scTab's ``classifier.`` prefix.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def set_input_scaling(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        """Standardise every gene to ``(x - mean) / scale`` (after normalisation), clipped to ``±CLIP``."""
        for name, value in (("input_mean", mean), ("input_scale", scale)):
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if hasattr(self, name):
                getattr(self, name).copy_(value)
            else:
                self.register_buffer(name, value.clone())

    @property
    def n_latent(self) -> int:
        """Width of the embedding."""
        return self.classifier.n_latent

    def prepare(self, x: torch.Tensor, normalize: bool = True, inplace: bool = False) -> torch.Tensor:
        """The backbone's input: normalisation and the standardisation with its clamp, in place when allowed.

        ``inplace=True`` overwrites ``x`` (a batch buffer of the caller's, e.g. :class:`~schce.nn.Densifier`'s):
        the same operations on the same values, without a new ``(B, n_genes)`` tensor at each of the five steps.
        """
        if not inplace or x.requires_grad:
            if normalize:
                x = normalize_counts(x)
            if hasattr(self, "input_mean"):
                x = ((x - self.input_mean) / self.input_scale).clamp(-CLIP, CLIP)
            return x
        if normalize:
            x.mul_(TARGET_SUM / x.sum(dim=1, keepdim=True).clamp_min(1e-12)).log1p_()
        if hasattr(self, "input_mean"):
            x.sub_(self.input_mean).div_(self.input_scale).clamp_(-CLIP, CLIP)
        return x

    def forward(
        self, x: torch.Tensor, normalize: bool = True, inplace: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate embedding.

        Parameters
        ----------
        x
            ``(B, n_genes)`` counts (``normalize=True``) or already log-normalised values.
        normalize
            Whether to apply :func:`normalize_counts` first (before the standardisation, when set).
        inplace
            Preprocess ``x`` in place (:meth:`prepare`, and the MLP's input dropout); for batch buffers the caller
            does not keep.

        Returns
        -------
        ``(logits (B, n_labels), embedding (B, n_latent))``.
        """
        x = self.prepare(x, normalize, inplace)
        # a wide & deep backbone's linear logits read the input before the input dropout may overwrite it
        wide = getattr(self.classifier, "wide_logits", None)
        skip = wide(x) if wide is not None else None
        if inplace and not x.requires_grad and getattr(self.classifier, "embeds_inplace", False):
            h = self.classifier.embed(x, inplace=True)  # the MLP's input dropout, in the same buffer
        else:
            h = self.classifier.embed(x)
        logits = self.classifier.classify(h)
        return (logits if skip is None else logits + skip), h
