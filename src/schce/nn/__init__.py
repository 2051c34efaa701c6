"""Backbones and the classifier module: plain :class:`torch.nn.Module`s that know nothing of AnnData."""

from schce.nn._backbones import MLP, Linear, make_backbone
from schce.nn._batch import Densifier, densify
from schce.nn._head import extend_head, output_layer
from schce.nn._module import HCEModule, normalize_counts
from schce.nn._tabnet import TabNet

__all__ = [
    "MLP",
    "Densifier",
    "densify",
    "HCEModule",
    "Linear",
    "extend_head",
    "make_backbone",
    "normalize_counts",
    "output_layer",
    "TabNet",
]
