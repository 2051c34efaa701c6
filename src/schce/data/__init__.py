"""Data access: expression checks, gene alignment and AnnData loaders."""

from schce.data._augmentation import augmentation_matrix
from schce.data._expression import ExpressionSummary, check_expression, get_matrix
from schce.data._genes import GeneAligner, strip_ensembl_version

__all__ = [
    "ExpressionSummary",
    "augmentation_matrix",
    "GeneAligner",
    "check_expression",
    "get_matrix",
    "strip_ensembl_version",
]
