"""The classifier module: in-graph normalisation followed by a backbone."""

from __future__ import annotations

import torch
from torch import nn

TARGET_SUM = 1e4


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


class HCEModule(nn.Module):
    """Normalisation + backbone.

    Parameters
    ----------
    classifier
        A backbone with ``embed`` and ``classify`` (see :mod:`schce.nn`). Stored as ``classifier`` so the
        state dict uses scTab's ``classifier.`` prefix.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

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
            Whether to apply :func:`normalize_counts` first.

        Returns
        -------
        ``(logits (B, n_labels), embedding (B, n_latent))``.
        """
        if normalize:
            x = normalize_counts(x)
        h = self.classifier.embed(x)
        return self.classifier.classify(h), h
