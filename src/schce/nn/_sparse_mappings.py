"""The sparse probability mappings of TabNet's attentive transformer: sparsemax and 1.5-entmax, with exact gradients.

sparsemax (Martins & Astudillo, 2016) and 1.5-entmax (Peters, Niculae & Martins, 2019) map scores to probabilities
that are exactly zero below a threshold, so each TabNet step attends to few genes. Both are closed-form (sort,
cumulative sums) with hand-written backward passes; :class:`_Selector` picks one by TabNet's ``mask_type``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["entmax15", "sparsemax"]


# --------------------------------------------------------------------------------------------------------------
# Sparse probability mappings
# --------------------------------------------------------------------------------------------------------------


def _ranks_like(z: torch.Tensor, dim: int) -> torch.Tensor:
    """``1, 2, …, n`` along ``dim``, shaped to broadcast against ``z``."""
    n = z.shape[dim]
    shape = [1] * z.dim()
    shape[dim] = n
    return torch.arange(1, n + 1, device=z.device, dtype=z.dtype).view(shape)


class _Sparsemax(torch.autograd.Function):
    """Sparsemax (Martins & Astudillo, 2016): Euclidean projection of ``z`` onto the probability simplex.

    ``p = relu(z - tau)`` with ``tau`` chosen so that ``sum(p) = 1``. The Jacobian is
    ``diag(s) - s s^T / |S|`` with ``s`` the support indicator, which :meth:`backward` applies directly.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
        dim = dim % z.dim()
        z = z - z.amax(dim=dim, keepdim=True)  # shift invariance, for stability
        z_sorted, _ = torch.sort(z, dim=dim, descending=True)
        cumsum = z_sorted.cumsum(dim)
        k = _ranks_like(z, dim)
        # The k-th largest entry is in the support iff 1 + k z_(k) > sum_{j<=k} z_(j); the condition is monotone.
        support_size = (1 + k * z_sorted > cumsum).sum(dim=dim, keepdim=True)
        tau = (cumsum.gather(dim, support_size - 1) - 1) / support_size.to(z.dtype)
        p = torch.clamp(z - tau, min=0)
        ctx.dim = dim
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (p,) = ctx.saved_tensors
        dim = ctx.dim
        support = (p > 0).to(grad_output.dtype)
        g = grad_output * support
        mean_on_support = g.sum(dim=dim, keepdim=True) / support.sum(dim=dim, keepdim=True)
        return support * (grad_output - mean_on_support), None


class _Entmax15(torch.autograd.Function):
    """1.5-entmax (Peters, Niculae & Martins, 2019): ``p_i = relu((alpha - 1) z_i - tau)^(1/(alpha - 1))``.

    With ``alpha = 1.5`` this is ``p_i = relu(z_i / 2 - tau)^2`` where ``tau`` makes ``p`` sum to one. For a
    candidate support of the ``k`` largest halves ``u_(1) >= … >= u_(k)`` the threshold solves the quadratic
    ``sum_{j<=k} (u_(j) - tau)^2 = 1``, i.e. ``tau_k = mean_k - sqrt((1 - k var_k) / k)`` with ``mean_k`` and
    ``var_k`` the mean and (biased) variance of those ``k`` values; the support is the largest ``k`` with
    ``tau_k <= u_(k)``. The Jacobian is ``diag(s) - s s^T / sum(s)`` with ``s = sqrt(p)``.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int = -1) -> torch.Tensor:
        dim = dim % z.dim()
        u = (z - z.amax(dim=dim, keepdim=True)) / 2
        u_sorted, _ = torch.sort(u, dim=dim, descending=True)
        k = _ranks_like(u, dim)
        mean = u_sorted.cumsum(dim) / k
        mean_sq = (u_sorted**2).cumsum(dim) / k
        delta = (1 - k * (mean_sq - mean**2)) / k
        tau = mean - torch.sqrt(torch.clamp(delta, min=0))
        support_size = (tau <= u_sorted).sum(dim=dim, keepdim=True)
        tau_star = tau.gather(dim, support_size - 1)
        p = torch.clamp(u - tau_star, min=0) ** 2
        ctx.dim = dim
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (p,) = ctx.saved_tensors
        dim = ctx.dim
        s = p.sqrt()
        gs = grad_output * s
        correction = gs.sum(dim=dim, keepdim=True) / s.sum(dim=dim, keepdim=True)
        return gs - correction * s, None


def sparsemax(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sparsemax of ``z`` along ``dim``: a probability vector that can contain exact zeros.

    Parameters
    ----------
    z
        Scores.
    dim
        Dimension that sums to one.

    Returns
    -------
    Tensor of the shape of ``z``, non-negative, summing to one along ``dim``.
    """
    return _Sparsemax.apply(z, dim)


def entmax15(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """1.5-entmax of ``z`` along ``dim``: between softmax (dense) and sparsemax (sparsest).

    Parameters
    ----------
    z
        Scores.
    dim
        Dimension that sums to one.

    Returns
    -------
    Tensor of the shape of ``z``, non-negative, summing to one along ``dim``.
    """
    return _Entmax15.apply(z, dim)


class _Selector(nn.Module):
    """Parameter-free wrapper so the mask function shows up in ``repr`` (it adds nothing to the state dict)."""

    def __init__(self, mask_type: str):
        super().__init__()
        if mask_type not in ("entmax", "sparsemax"):
            raise ValueError(f"mask_type must be 'entmax' or 'sparsemax', got {mask_type!r}.")
        self.mask_type = mask_type

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return entmax15(z, -1) if self.mask_type == "entmax" else sparsemax(z, -1)

    def extra_repr(self) -> str:
        return self.mask_type
