"""Hierarchical cross-entropy (HCE) loss over a label hierarchy.

The hierarchy over ``K`` ordered labels is given by a reachability matrix ``R`` of shape ``(K, K)`` with
``R[i, j] = 1`` iff label ``j`` is label ``i`` or one of its descendants (``R`` is reflexive). The predicted
probability of label ``i`` is the total softmax mass of ``i`` and its descendants, ``q = softmax(logits) @ R.T``,
and the loss of a sample with target ``t`` is ``-log q[t]``.

Two forms are provided:

* ``"reference"`` reproduces the published implementation bit for bit,
  ``nll_loss(log(softmax(logits) @ R.T + eps), targets)``. Once the softmax saturates, ``q`` underflows to zero,
  the loss sticks at ``-log(eps)`` and its gradient vanishes.
* ``"log"`` (default) computes ``log q[t]`` exactly in log space as a masked ``logsumexp`` minus the full
  ``logsumexp``, so the loss and its gradient stay finite and informative for arbitrarily confident logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "HierarchicalCrossEntropyLoss",
    "hierarchical_cross_entropy",
    "hierarchical_log_probs",
    "log_mask_probability",
]

_FORMS = ("log", "reference")
_REDUCTIONS = ("mean", "sum", "none")
# Upper bound on elements of one (B, chunk, K) block in ``hierarchical_log_probs`` (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked_logsumexp(x: Tensor, mask: Tensor) -> Tensor:
    """Logsumexp over the last dimension restricted to ``mask``.

    Parameters
    ----------
    x
        Values, shape ``(..., K)``.
    mask
        Boolean mask broadcastable with ``x``, shape ``(..., K)``.

    Returns
    -------
    Tensor
        Shape ``broadcast(x, mask).shape[:-1]``; ``-inf`` (with zero gradient) where the mask is empty.

    """
    empty = ~mask.any(dim=-1)
    # An all -inf row makes logsumexp's backward compute exp(-inf - -inf) = NaN; keep such rows finite and
    # overwrite their result afterwards so no NaN reaches the gradient.
    keep = mask | empty.unsqueeze(-1)
    out = torch.logsumexp(torch.where(keep, x, -math.inf), dim=-1)
    return out.masked_fill(empty, -math.inf)


def log_mask_probability(logits: Tensor, mask: Tensor) -> Tensor:
    """Log of the softmax mass falling on a set of labels, computed exactly in log space.

    Returns ``log sum_{j : mask[..., j]} softmax(logits)[..., j]`` as ``logsumexp`` of the logits with the
    non-masked entries set to ``-inf`` minus ``logsumexp`` of all logits. Unlike ``log(softmax(logits) @ mask)``
    this neither underflows nor loses its gradient when the softmax saturates.

    Parameters
    ----------
    logits
        Unnormalised scores, shape ``(B, K)`` (any leading dimensions ``(..., K)`` are accepted).
    mask
        Acceptable labels per row, shape ``(B, K)`` (or broadcastable to ``logits``), bool or 0/1 valued.

    Returns
    -------
    Tensor
        Log-probabilities, shape ``(B,)`` (``logits.shape[:-1]``). Rows with an empty mask give ``-inf``
        with a zero gradient.

    Raises
    ------
    ValueError
        If ``logits`` is not a floating tensor with at least one dimension or ``mask`` does not broadcast to
        ``logits.shape``.

    """
    if logits.ndim < 1 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor of shape (B, K), got {logits.dtype} {tuple(logits.shape)}")
    try:
        shape = torch.broadcast_shapes(logits.shape, mask.shape)
    except RuntimeError:
        shape = None
    if shape != logits.shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to logits of shape {tuple(logits.shape)}"
        )
    mask = _as_bool(mask).to(logits.device)
    return _masked_logsumexp(logits, mask) - torch.logsumexp(logits, dim=-1)


def _check_logits_reachability(logits: Tensor, reachability: Tensor) -> int:
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating tensor of shape (B, K), got {logits.dtype} {tuple(logits.shape)}")
    k = logits.shape[1]
    if tuple(reachability.shape) != (k, k):
        raise ValueError(f"reachability must have shape (K, K) = ({k}, {k}), got {tuple(reachability.shape)}")
    return k


def hierarchical_log_probs(logits: Tensor, reachability: Tensor) -> Tensor:
    """Log predicted probability of every label, ``log(softmax(logits) @ reachability.T)``, computed exactly.

    Each entry is a masked ``logsumexp`` over the label's subtree minus the full ``logsumexp``, so values are
    exact and finite even for saturated logits (e.g. ``+-1e4``) where the probability itself would underflow.

    Parameters
    ----------
    logits
        Unnormalised scores, shape ``(B, K)``.
    reachability
        Reachability matrix, shape ``(K, K)``, bool or 0/1 valued; ``reachability[i, j]`` is nonzero iff label
        ``j`` is label ``i`` or a descendant of it.

    Returns
    -------
    Tensor
        ``log q``, shape ``(B, K)``. Labels with an all-zero reachability row give ``-inf``.

    Raises
    ------
    ValueError
        If ``logits`` is not 2-D floating or ``reachability`` is not ``(K, K)``.

    Notes
    -----
    The masked ``logsumexp`` works on ``(B, c, K)`` blocks with ``c`` labels at a time, chosen so one block holds
    at most ``2**24`` elements; the forward peak memory is therefore ``O(B*K + 2**24)``. With autograd, each block
    is kept for the backward pass, i.e. ``O(B*K*K)`` in total. Use it for inference and diagnostics; the loss
    itself only needs the targets' rows and stays ``O(B*K)``.

    """
    k = _check_logits_reachability(logits, reachability)
    b = logits.shape[0]
    mask = _as_bool(reachability).to(logits.device)
    chunk = max(1, min(k, _CHUNK_ELEMENTS // max(1, b * k)))
    x = logits.unsqueeze(1)  # (B, 1, K), broadcast against (1, c, K) mask blocks
    parts = [_masked_logsumexp(x, mask[start : start + chunk].unsqueeze(0)) for start in range(0, k, chunk)]
    masked = torch.cat(parts, dim=1) if parts else logits.new_empty(b, 0)
    return masked - torch.logsumexp(logits, dim=-1, keepdim=True)


def hierarchical_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    reachability: Tensor,
    weight: Tensor | None = None,
    *,
    form: str = "log",
    reduction: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Hierarchical cross-entropy, ``-log q[target]`` with ``q = softmax(logits) @ reachability.T``.

    Parameters
    ----------
    logits
        Unnormalised scores, shape ``(B, K)``.
    targets
        Target label indices in ``[0, K)``, shape ``(B,)``, dtype ``torch.long``. There is no ``ignore_index``.
    reachability
        Reachability matrix, shape ``(K, K)``, bool or 0/1 valued; ``reachability[i, j]`` is nonzero iff label
        ``j`` is label ``i`` or a descendant of it.
    weight
        Optional per-class weights, shape ``(K,)``; sample ``b`` is weighted by ``weight[targets[b]]``.
    form
        ``"log"`` (default): exact log-space computation, ``-log_mask_probability(logits, reachability[targets])``;
        memory ``O(B*K)``. ``"reference"``: the published form, bit for bit,
        ``nll_loss(log(softmax(logits) @ reachability.T + eps), targets, weight, reduction)``.
    reduction
        ``"mean"`` (``sum(w_b * l_b) / sum(w_b)``), ``"sum"`` (``sum(w_b * l_b)``) or ``"none"`` (``w_b * l_b``),
        exactly as :func:`torch.nn.functional.nll_loss`.
    eps
        Offset inside the logarithm; used by ``form="reference"`` only.

    Returns
    -------
    Tensor
        Scalar for ``"mean"``/``"sum"``, shape ``(B,)`` for ``"none"``.

    Raises
    ------
    ValueError
        If shapes or dtypes are inconsistent, or ``form``/``reduction`` is not one of the allowed values.

    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    k = _check_logits_reachability(logits, reachability)
    b = logits.shape[0]
    if targets.ndim != 1 or targets.dtype != torch.long or targets.shape[0] != b:
        raise ValueError(
            f"targets must be a torch.long tensor of shape ({b},), got {targets.dtype} {tuple(targets.shape)}"
        )
    if weight is not None:
        if tuple(weight.shape) != (k,):
            raise ValueError(f"weight must have shape (K,) = ({k},), got {tuple(weight.shape)}")
        weight = weight.to(dtype=logits.dtype, device=logits.device)

    if form == "reference":
        r = reachability.to(dtype=logits.dtype, device=logits.device)
        p = torch.softmax(logits, dim=-1)
        q = p @ r.T
        return F.nll_loss(torch.log(q + eps), targets, weight=weight, reduction=reduction)

    # Only the targets' rows of R are needed, which keeps memory at O(B*K).
    mask = _as_bool(reachability.to(logits.device)[targets])
    loss = -log_mask_probability(logits, mask)
    if weight is None:
        if reduction == "mean":
            return loss.mean()
        return loss.sum() if reduction == "sum" else loss
    w = weight[targets]
    loss = w * loss
    if reduction == "mean":
        return loss.sum() / w.sum()
    return loss.sum() if reduction == "sum" else loss


class HierarchicalCrossEntropyLoss(torch.nn.Module):
    """Module wrapper of :func:`hierarchical_cross_entropy`.

    ``reachability`` and ``weight`` are registered as non-persistent buffers: they follow the module across
    devices but stay out of ``state_dict()``, so a model holding this loss saves only its own parameters.

    Parameters
    ----------
    reachability
        Reachability matrix, shape ``(K, K)``, bool or 0/1 valued.
    weight
        Optional per-class weights, shape ``(K,)``.
    form
        ``"log"`` (default) or ``"reference"``; see :func:`hierarchical_cross_entropy`.
    eps
        Offset inside the logarithm of the reference form.
    reduction
        ``"mean"`` (default), ``"sum"`` or ``"none"``.

    """

    reachability: Tensor
    weight: Tensor | None

    def __init__(
        self,
        reachability: Tensor,
        weight: Tensor | None = None,
        form: str = "log",
        eps: float = 1e-6,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if reachability.ndim != 2 or reachability.shape[0] != reachability.shape[1]:
            raise ValueError(f"reachability must have shape (K, K), got {tuple(reachability.shape)}")
        if weight is not None and tuple(weight.shape) != (reachability.shape[0],):
            raise ValueError(f"weight must have shape (K,) = ({reachability.shape[0]},), got {tuple(weight.shape)}")
        self.register_buffer("reachability", reachability, persistent=False)
        self.register_buffer("weight", weight, persistent=False)
        self.form = form
        self.eps = eps
        self.reduction = reduction

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Compute the loss.

        Parameters
        ----------
        logits
            Unnormalised scores, shape ``(B, K)``.
        targets
            Target label indices, shape ``(B,)``, dtype ``torch.long``.

        Returns
        -------
        Tensor
            Scalar for ``"mean"``/``"sum"``, shape ``(B,)`` for ``"none"``.

        """
        return hierarchical_cross_entropy(
            logits, targets, self.reachability, self.weight, form=self.form, reduction=self.reduction, eps=self.eps
        )

    def extra_repr(self) -> str:
        """Summarise the configuration."""
        return f"num_labels={self.reachability.shape[0]}, form={self.form!r}, reduction={self.reduction!r}"
