"""schce: cell-type annotation with the Cell Ontology and the hierarchical cross-entropy loss."""

from importlib.metadata import version as _version

from schce import datasets, evaluation, losses, metrics, pl
from schce.hierarchy import Hierarchy, HierarchyCycleError
from schce.model import HCEClassifier
from schce.ontology import CellOntology, LabelMappingError, load_cell_ontology

__version__ = _version("schce")

__all__ = [
    "CellOntology",
    "HCEClassifier",
    "Hierarchy",
    "HierarchyCycleError",
    "LabelMappingError",
    "datasets",
    "evaluation",
    "load_cell_ontology",
    "losses",
    "metrics",
    "pl",
]
