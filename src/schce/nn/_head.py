"""Growing a backbone's output layer by new labels (for fine-tuning on labels the model has not seen)."""

from __future__ import annotations

import torch
from torch import nn


def output_layer(classifier: nn.Module) -> nn.Linear:
    """The linear layer that maps the embedding to the logits.

    ``linear`` (MLP), ``final_mapping`` (TabNet), or the whole model for the logistic-regression
    :class:`~schce.nn.Linear`.
    """
    for name in ("linear", "final_mapping"):
        layer = getattr(classifier, name, None)
        if isinstance(layer, nn.Linear):
            return layer
    if isinstance(classifier, nn.Linear):
        return classifier
    raise TypeError(f"{type(classifier).__name__} has no linear output layer ('linear' or 'final_mapping').")


def extend_head(classifier: nn.Module, n_new: int) -> nn.Module:
    """Add ``n_new`` output rows to ``classifier``'s output layer, in place.

    The existing rows keep their weights (and bias) exactly, so the logits of the existing labels do not change;
    the new rows are initialised as a fresh layer of the same shape would be (draws from torch's global generator,
    so seed it for reproducibility). The new labels are the last ``n_new`` outputs.

    Parameters
    ----------
    classifier
        A backbone of :mod:`schce.nn` (or any module whose output layer :func:`output_layer` finds).
    n_new
        Number of outputs to add.

    Returns
    -------
    ``classifier`` itself.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be ≥ 0, got {n_new}.")
    layer = output_layer(classifier)
    if n_new == 0:
        return classifier
    wide = getattr(classifier, "wide", None)  # a wide & deep MLP's linear logits grow alike
    for grown in (layer, wide) if isinstance(wide, nn.Linear) else (layer,):
        _add_rows(grown, n_new)
    if hasattr(classifier, "n_labels"):  # TabNet records its output width
        classifier.n_labels = layer.out_features
    return classifier


def _add_rows(layer: nn.Linear, n_new: int) -> None:
    """``n_new`` freshly initialised output rows appended to ``layer``, in place; the existing rows unchanged."""
    w = layer.weight
    fresh = nn.Linear(layer.in_features, n_new, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.cat([w.detach(), fresh.weight]), requires_grad=w.requires_grad)
        if layer.bias is not None:
            layer.bias = nn.Parameter(torch.cat([layer.bias.detach(), fresh.bias]), requires_grad=w.requires_grad)
    layer.out_features += n_new
