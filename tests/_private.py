"""The private names tests reach for, imported in this one place so a move inside the package changes one file."""

from benchmarks._tasks import LABELS, leave_one_batch_out
from benchmarks.real_data import per_class_lines

from schce._memory import release_free_memory
from schce.data._augmentation import augment
from schce.data._loader import group_split, split_cells
from schce.data._protocol import datamodule_class_weights
from schce.data.sctab._format import (
    _dense_values,
    read_part_metadata,
    split_parts,
    store_layout,
    varint_decode,
    varint_encode,
)
from schce.nn._backbones import BACKBONES
from schce.nn._module import CLIP, gene_moments
from schce.nn._tabnet import GhostBatchNorm, entmax15, sparsemax
from schce.train._callbacks import HistoryRecorder
from schce.train._config import DEFAULT_BACKBONE_KWARGS
from schce.train._recipe import matmul_precision

__all__ = [
    "BACKBONES",
    "CLIP",
    "DEFAULT_BACKBONE_KWARGS",
    "GhostBatchNorm",
    "HistoryRecorder",
    "LABELS",
    "_dense_values",
    "augment",
    "datamodule_class_weights",
    "entmax15",
    "gene_moments",
    "group_split",
    "leave_one_batch_out",
    "matmul_precision",
    "per_class_lines",
    "read_part_metadata",
    "release_free_memory",
    "sparsemax",
    "split_cells",
    "split_parts",
    "store_layout",
    "varint_decode",
    "varint_encode",
]
