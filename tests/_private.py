"""The private names the tests reach into, imported in one place so that moving a module changes only this file.

Everything else in the tests uses the public API (``schce``, ``schce.data``, ``schce.nn``, ``schce.train``, ...).
"""

from schce._benchmarking import (
    COARSEN,
    LABELS,
    PBMC68K_T_CELLS,
    T_CELL,
    leave_one_batch_out,
    mix_granularity,
    per_label_summary,
)
from schce._memory import release_free_memory
from schce._output import CHUNK_CELLS, SPARSE_SCORE_MIN, SPARSE_TOP, PredictionAccumulator, prediction_frame
from schce.data._augmentation import augment, published_augmentation_candidates
from schce.data._loader import EpochBatchSampler, group_split, make_loader, split_cells
from schce.data._protocol import datamodule_class_weights
from schce.data.sctab import _kernels as store_kernels
from schce.data.sctab._format import (
    _dense_values,
    decode_cells,
    decode_cells_numpy,
    encode_cells,
    label_usage,
    read_part_metadata,
    split_parts,
    store_layout,
    varint_decode,
    varint_encode,
)
from schce.model._store import store_setup
from schce.nn._backbones import BACKBONES
from schce.nn._batch import csr_batch
from schce.nn._module import CLIP, gene_moments
from schce.nn._sparse_mappings import entmax15, sparsemax
from schce.nn._tabnet import GhostBatchNorm
from schce.train._callbacks import HistoryRecorder, TrainingProgress
from schce.train._config import DEFAULT_BACKBONE_KWARGS, TrainConfig
from schce.train._plan import adamw
from schce.train._recipe import LBFGS_MAX_VALUES, PAPER_MONITOR, RECIPES, matmul_precision, resolve_optimizer

__all__ = [
    "BACKBONES",
    "CHUNK_CELLS",
    "CLIP",
    "COARSEN",
    "DEFAULT_BACKBONE_KWARGS",
    "EpochBatchSampler",
    "GhostBatchNorm",
    "HistoryRecorder",
    "LABELS",
    "label_usage",
    "LBFGS_MAX_VALUES",
    "PBMC68K_T_CELLS",
    "PAPER_MONITOR",
    "PredictionAccumulator",
    "RECIPES",
    "SPARSE_SCORE_MIN",
    "SPARSE_TOP",
    "T_CELL",
    "TrainConfig",
    "TrainingProgress",
    "_dense_values",
    "adamw",
    "augment",
    "csr_batch",
    "datamodule_class_weights",
    "decode_cells",
    "decode_cells_numpy",
    "encode_cells",
    "entmax15",
    "gene_moments",
    "group_split",
    "leave_one_batch_out",
    "make_loader",
    "matmul_precision",
    "mix_granularity",
    "per_label_summary",
    "prediction_frame",
    "published_augmentation_candidates",
    "read_part_metadata",
    "release_free_memory",
    "resolve_optimizer",
    "sparsemax",
    "split_cells",
    "split_parts",
    "store_kernels",
    "store_layout",
    "store_setup",
    "varint_decode",
    "varint_encode",
]
