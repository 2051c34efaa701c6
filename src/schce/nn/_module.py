"""The classifier module: in-graph normalisation followed by a backbone."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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


def gene_moments(
    batches: Iterable[dict], normalize: bool, max_cells: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-gene mean and standard deviation of the model's inputs, streamed over batches.

    Parameters
    ----------
    batches
        Batches with an ``"x"`` tensor ``(B, n_genes)``, as the training loaders yield them.
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
        x = batch["x"].float()
        if normalize:
            x = normalize_counts(x)
        # float64 sums (the batch itself stays float32, its size in memory): one pass over millions of cells must
        # not lose the variance to cancellation.
        total = total + x.sum(0, dtype=torch.float64)
        total_sq, n = total_sq + x.square().sum(0, dtype=torch.float64), n + len(x)
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

    def forward(self, x: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and penultimate embedding.

        Parameters
        ----------
        x
            ``(B, n_genes)`` counts (``normalize=True``) or already log-normalised values.
        normalize
            Whether to apply :func:`normalize_counts` first (before the standardisation, when set).

        Returns
        -------
        ``(logits (B, n_labels), embedding (B, n_latent))``.
        """
        if normalize:
            x = normalize_counts(x)
        if hasattr(self, "input_mean"):
            x = ((x - self.input_mean) / self.input_scale).clamp(-CLIP, CLIP)
        h = self.classifier.embed(x)
        return self.classifier.classify(h), h
