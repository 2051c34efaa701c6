"""Batch-correction terms: batch mixing in soft neighbourhoods and domain-adversarial training."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from schce.losses._validation import (
    _CDIST_MODE,
    _check_float,
    _check_labels,
    _check_non_negative,
    _check_positive,
    _entropy,
)

# --------------------------------------------------------------------------------------------------------------------
# Batch mixing
# --------------------------------------------------------------------------------------------------------------------


class BatchMixingLoss(nn.Module):
    """Negative entropy of the batch composition of each cell's soft nearest-neighbour neighbourhood.

    For each cell ``i``, the Euclidean distances ``d_ij`` to all other cells are computed (the cell itself is
    excluded) and the ``k = min(n_neighbors, N - 1)`` nearest are kept. Their weights are
    ``w_ij = softmax_j(-d_ij / temperature)`` over these ``k`` neighbours, the neighbourhood batch distribution is
    ``p_ib = sum_j w_ij [batch_j = b]`` and its entropy is ``H_i = -sum_b p_ib log p_ib`` (``0 log 0 = 0``). The loss
    is ``-mean_i H_i``; it lies in ``[-log(n_batches), 0]`` and is lower when batches are better mixed.

    Gradients reach the embeddings through the soft weights ``w_ij`` only: which cells are the ``k`` nearest is a
    discrete choice with no gradient (ties are broken arbitrarily by :func:`torch.topk`). A cell whose neighbours all
    come from one batch has ``H_i = 0`` exactly and contributes no gradient, so when a single batch is present the
    loss is exactly 0 with zero (finite) gradients. Identical embeddings (zero distances) give uniform weights.

    Memory is ``O(N^2)`` for the distance matrix, so use it on mini-batches.

    Parameters
    ----------
    n_batches
        Number of batches ``B`` (``>= 1``); labels lie in ``[0, B)``.
    n_neighbors
        Neighbourhood size ``k`` (``>= 1``); reduced to ``N - 1`` for smaller inputs.
    temperature
        Softmax temperature (``> 0``) on the negative distances; larger values spread the weight more evenly.

    """

    def __init__(self, n_batches: int, n_neighbors: int = 15, temperature: float = 1.0) -> None:
        super().__init__()
        if int(n_batches) != n_batches or n_batches < 1:
            raise ValueError(f"n_batches must be an integer >= 1, got {n_batches!r}")
        if int(n_neighbors) != n_neighbors or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
        _check_positive("temperature", temperature)
        self.n_batches = int(n_batches)
        self.n_neighbors = int(n_neighbors)
        self.temperature = float(temperature)

    def forward(self, embeddings: Tensor, batch_labels: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        embeddings
            Cell embeddings, shape ``(N, D)``, floating, ``N >= 2``.
        batch_labels
            Batch index of every cell, shape ``(N,)``, dtype ``torch.long``, values in ``[0, n_batches)``.

        Returns
        -------
        Tensor
            Scalar ``-mean_i H_i`` in ``[-log(n_batches), 0]``.

        Raises
        ------
        ValueError
            If the shapes or dtypes are wrong, a label is out of range or ``N < 2``.

        """
        _check_float("embeddings", embeddings, 2, "(N, D)")
        n = embeddings.shape[0]
        if n < 2:
            raise ValueError(
                f"embeddings must have shape (N, D) with N >= 2 to have neighbours, got {tuple(embeddings.shape)}"
            )
        labels = _check_labels("batch_labels", batch_labels, n, self.n_batches).to(embeddings.device)
        k = min(self.n_neighbors, n - 1)

        dist = torch.cdist(embeddings, embeddings, compute_mode=_CDIST_MODE)
        # +inf on the diagonal keeps a cell out of its own neighbourhood; k <= N - 1 so it is never selected.
        self_mask = torch.eye(n, dtype=torch.bool, device=embeddings.device)
        nn_dist, nn_idx = torch.topk(dist.masked_fill(self_mask, math.inf), k, dim=1, largest=False)
        weights = torch.softmax(-nn_dist / self.temperature, dim=1)  # (N, k)
        nn_batches = F.one_hot(labels[nn_idx], self.n_batches).to(weights.dtype)  # (N, k, B)
        p = torch.einsum("nk,nkb->nb", weights, nn_batches)  # (N, B), rows sum to 1

        # Softmax weights sum to 1 only up to rounding, so a one-batch neighbourhood would give a tiny non-zero
        # entropy (and a gradient); counting the batches present makes those cells exactly 0.
        n_present = (nn_batches.sum(dim=1) > 0).sum(dim=1)
        entropy = torch.where(n_present > 1, _entropy(p), torch.zeros_like(p[:, 0]))
        return -entropy.mean()

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"n_batches={self.n_batches}, n_neighbors={self.n_neighbors}, temperature={self.temperature}"


# --------------------------------------------------------------------------------------------------------------------
# Domain-adversarial training
# --------------------------------------------------------------------------------------------------------------------


class _GradientReversalFunction(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``-alpha`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: float) -> Tensor:
        """Return ``x`` unchanged (as a view, so no copy is made)."""
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        """Reverse and scale the gradient; ``alpha`` gets none."""
        return -ctx.alpha * grad_output, None


def grad_reverse(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Gradient reversal: the identity forward, the gradient times ``-alpha`` backward.

    Parameters
    ----------
    x
        Any tensor.
    alpha
        Scale (``>= 0``) of the reversed gradient.

    Returns
    -------
    Tensor
        ``x`` (same shape and values).

    """
    _check_non_negative("alpha", alpha)
    return _GradientReversalFunction.apply(x, float(alpha))


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`.

    ``alpha`` is a plain attribute, so a schedule (e.g. DANN's ramp from 0 to 1) can change it during training.

    Parameters
    ----------
    alpha
        Scale (``>= 0``) of the reversed gradient.

    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        _check_non_negative("alpha", alpha)
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x``; its gradient is multiplied by ``-alpha``.

        Parameters
        ----------
        x
            Any tensor.

        Returns
        -------
        Tensor
            ``x`` (same shape and values).

        """
        return grad_reverse(x, self.alpha)

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"alpha={self.alpha}"


class DomainAdversarialLoss(nn.Module):
    """Cross-entropy of a domain discriminator placed behind a gradient reversal layer.

    The discriminator is an MLP with ``n_layers`` hidden blocks ``Linear -> LeakyReLU`` of width ``hidden`` and a
    final ``Linear(., n_domains)`` (``n_layers = 0`` gives a linear classifier). Adding this loss to a training
    objective trains the discriminator to predict the domain (its parameters receive the ordinary gradient) while
    the embeddings, and whatever produced them, receive ``-alpha`` times that gradient and so learn to confuse it.

    Parameters
    ----------
    n_input
        Embedding dimension (``>= 1``).
    n_domains
        Number of domains (``>= 2``).
    hidden
        Width of the hidden layers (``>= 1``).
    n_layers
        Number of hidden ``Linear -> LeakyReLU`` blocks (``>= 0``).
    alpha
        Scale (``>= 0``) of the reversed gradient; settable later through :attr:`alpha`.

    """

    def __init__(self, n_input: int, n_domains: int, hidden: int = 128, n_layers: int = 2, alpha: float = 1.0) -> None:
        super().__init__()
        for name, value, low in (("n_input", n_input, 1), ("n_domains", n_domains, 2), ("hidden", hidden, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if int(n_layers) != n_layers or n_layers < 0:
            raise ValueError(f"n_layers must be an integer >= 0, got {n_layers!r}")
        self.n_input = int(n_input)
        self.n_domains = int(n_domains)
        self.gradient_reversal = GradientReversal(alpha)
        layers: list[nn.Module] = []
        width = self.n_input
        for _ in range(int(n_layers)):
            layers += [nn.Linear(width, int(hidden)), nn.LeakyReLU()]
            width = int(hidden)
        layers.append(nn.Linear(width, self.n_domains))
        self.discriminator = nn.Sequential(*layers)

    @property
    def alpha(self) -> float:
        """Scale of the reversed gradient."""
        return self.gradient_reversal.alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        _check_non_negative("alpha", value)
        self.gradient_reversal.alpha = float(value)

    def _check_embeddings(self, embeddings: Tensor) -> None:
        _check_float("embeddings", embeddings, 2, f"(N, n_input) = (N, {self.n_input})")
        if embeddings.shape[1] != self.n_input:
            raise ValueError(
                f"embeddings must have shape (N, n_input) = (N, {self.n_input}), got {tuple(embeddings.shape)}"
            )

    def logits(self, embeddings: Tensor) -> Tensor:
        """Domain logits of the discriminator, computed behind the gradient reversal.

        Parameters
        ----------
        embeddings
            Cell embeddings, shape ``(N, n_input)``, floating.

        Returns
        -------
        Tensor
            Logits, shape ``(N, n_domains)``.

        """
        self._check_embeddings(embeddings)
        return self.discriminator(self.gradient_reversal(embeddings))

    def forward(self, embeddings: Tensor, domain_labels: Tensor) -> Tensor:
        """Compute the mean cross-entropy of the discriminator on the domain labels.

        Parameters
        ----------
        embeddings
            Cell embeddings, shape ``(N, n_input)``, floating, ``N >= 1``.
        domain_labels
            Domain of every cell, shape ``(N,)``, dtype ``torch.long``, values in ``[0, n_domains)``.

        Returns
        -------
        Tensor
            Scalar cross-entropy.

        Raises
        ------
        ValueError
            If the shapes or dtypes are wrong, a label is out of range or ``N = 0``.

        """
        self._check_embeddings(embeddings)
        n = embeddings.shape[0]
        if n == 0:
            raise ValueError(
                f"embeddings must have shape (N, {self.n_input}) with N >= 1, got {tuple(embeddings.shape)}"
            )
        labels = _check_labels("domain_labels", domain_labels, n, self.n_domains).to(embeddings.device)
        return F.cross_entropy(self.logits(embeddings), labels)

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"n_input={self.n_input}, n_domains={self.n_domains}"
