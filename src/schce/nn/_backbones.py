"""Classifier backbones with scTab-compatible state dicts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from schce.nn import _kernels
from schce.nn._tabnet import TabNet


class Linear(nn.Linear):
    """Logistic regression on the normalised expression: one ``nn.Linear(n_input, n_labels)``.

    Its state dict (``weight``, ``bias``) is that of scTab's linear classifier. It has no hidden layer, so its
    embedding is the logits.
    """

    def __init__(self, n_input: int, n_labels: int):
        super().__init__(n_input, n_labels)

    @property
    def n_latent(self) -> int:
        """Width of :meth:`embed`'s output."""
        return self.out_features

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_input) -> (B, n_labels)`` logits."""
        return super().forward(x)

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the embedding (the identity here)."""
        return h


class InputDropout(nn.Module):
    """Dropout of input genes whose CPU mask is drawn 16 bits per value instead of by ``bernoulli_``.

    ``torch.nn.Dropout`` draws its CPU mask with ``bernoulli_``, one serial call per value: at 2048 cells × 19,331
    genes it took 22% of an MLP training step. Here the mask comes from 64-bit words of ``torch.randint`` cut into
    four 16-bit draws, so the probability is ``p`` rounded to a multiple of 2⁻¹⁶ (and kept values are scaled by
    ``1 / (1 - p)`` of that rounded ``p``, so the expected input is unchanged). It draws from torch's global
    generator, so ``seed_everything`` makes it repeatable. On a GPU it is ``torch.nn.functional.dropout``.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"input_dropout must be in [0, 1), got {p}.")
        self.p = float(p)
        self.threshold = round(self.p * 2**16)  # values whose 16-bit draw is below this are dropped

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``x`` with dropped genes zeroed and the rest scaled; ``inplace`` overwrites ``x`` (a buffer of the caller's).

        In place, the same mask and values come without the two ``(B, n_genes)`` temporaries of the out-of-place
        form (at 2048 × 19,331 genes, 300 MB of fresh pages per step).
        """
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True, inplace=inplace)
        n = x.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        draws = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-2**15, 2**15)
        scale = 2**16 / (2**16 - self.threshold)
        if inplace:
            kernel = _kernels.dropout() if x.dtype == torch.float32 and x.is_contiguous() else None
            if kernel is None:
                return x.masked_fill_(draws < self.threshold - 2**15, 0.0).mul_(scale)
            # One pass instead of a mask, a fill and a scale (three quarters of the in-place dropout's time).
            kernel(
                x.numpy().reshape(-1), draws.numpy().reshape(-1), np.int16(self.threshold - 2**15), np.float32(scale)
            )
            return x
        return torch.where(draws >= self.threshold - 2**15, x * scale, 0.0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Module):
    """Multilayer perceptron: ``n_layers`` blocks ``[Linear, BatchNorm1d, SiLU, Dropout]`` and a linear head.

    The blocks live in one flat ``nn.Sequential`` named ``encoder`` and the head is ``linear``, so scTab's MLP
    state dicts map key for key (``encoder.0.weight`` … ``linear.bias``).

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of labels.
    n_hidden
        Width of every block.
    n_layers
        Number of blocks.
    dropout
        Dropout after every block.
    input_dropout
        Dropout on the input genes in training (``0``: none, as scTab's MLP): each gene of each cell is zeroed with
        this probability, which teaches the model not to lean on any single gene (detection is noisy in single
        cells and gene panels differ between studies). It has no parameters, so state dicts are unchanged.
    wide
        Add a linear map of the input genes to the logits ("wide & deep"): ``logits = head(encoder(x)) + wide(x)``,
        the wide part reading the input before input dropout. Off by default (scTab's MLP); its weights are the
        state dict's ``wide.weight`` / ``wide.bias``.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_hidden: int = 128,
        n_layers: int = 8,
        dropout: float = 0.1,
        input_dropout: float = 0.0,
        wide: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be ≥ 1, got {n_layers}.")
        layers: list[nn.Module] = []
        width = n_input
        for _ in range(n_layers):
            layers += [nn.Linear(width, n_hidden), nn.BatchNorm1d(n_hidden), nn.SiLU(), nn.Dropout(dropout)]
            width = n_hidden
        self.encoder = nn.Sequential(*layers)
        self.linear = nn.Linear(n_hidden, n_labels)
        self.input_dropout = InputDropout(input_dropout)
        self.wide = nn.Linear(n_input, n_labels) if wide else None

    #: :meth:`embed` may overwrite its input when asked (``inplace=True``, see :class:`~schce.nn.HCEModule`).
    embeds_inplace = True

    @property
    def n_latent(self) -> int:
        """Width of :meth:`embed`'s output."""
        return self.linear.in_features

    def embed(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``(B, n_input) -> (B, n_hidden)`` embedding; ``inplace``: the input dropout overwrites ``x``."""
        return self.encoder(self.input_dropout(x, inplace=inplace))

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """``(B, n_hidden) -> (B, n_labels)`` logits of the deep part."""
        return self.linear(h)

    def wide_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B, n_input) -> (B, n_labels)`` logits of the wide part, added to :meth:`classify`'s; ``None`` if off."""
        return None if self.wide is None else self.wide(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_input) -> (B, n_labels)`` logits."""
        skip = self.wide_logits(x)  # before the input dropout
        logits = self.classify(self.embed(x))
        return logits if skip is None else logits + skip


BACKBONES = {"linear": Linear, "mlp": MLP, "tabnet": TabNet}


def make_backbone(name: str, n_input: int, n_labels: int, **kwargs) -> nn.Module:
    """Build a backbone by name (``"linear"`` or ``"mlp"``) with its hyperparameters."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    return BACKBONES[name](n_input, n_labels, **kwargs)
