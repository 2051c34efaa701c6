"""Data access: the data-module contract, expression checks, gene alignment, AnnData and scTab store modules."""

from schce.data._anndata import AnnDataModule
from schce.data._augmentation import augmentation_matrix, published_augmentation_matrix
from schce.data._expression import ExpressionSummary, check_expression, get_matrix
from schce.data._genes import GeneAligner, strip_ensembl_version
from schce.data._protocol import HCEDataModule, balanced_class_weights, check_streaming_options
from schce.data.sctab import (
    SCTabStoreDataModule,
    StoreDataset,
    compare_hierarchy,
    convert_sctab_store,
    read_part_metadata,
    read_sctab_store,
    write_sctab_store,
)

__all__ = [
    "AnnDataModule",
    "HCEDataModule",
    "balanced_class_weights",
    "check_streaming_options",
    "ExpressionSummary",
    "GeneAligner",
    "SCTabStoreDataModule",
    "StoreDataset",
    "augmentation_matrix",
    "check_expression",
    "compare_hierarchy",
    "convert_sctab_store",
    "get_matrix",
    "published_augmentation_matrix",
    "read_part_metadata",
    "read_sctab_store",
    "strip_ensembl_version",
    "write_sctab_store",
]
