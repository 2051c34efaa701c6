"""schce: cell-type annotation with the Cell Ontology and the hierarchical cross-entropy loss.

Submodules and the classes that need torch, Lightning or scvi-tools load on first use (:pep:`562`), so
``import schce``, ``schce --help`` and the ontology and hierarchy modules stay fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version as _version
from typing import TYPE_CHECKING

from schce._settings import install_handler as _install_handler
from schce._settings import settings as settings

__version__ = _version("schce")
_install_handler()  # schce's INFO messages reach notebooks; schce.settings.verbosity turns them down

# Public name -> the module that defines it (a submodule when the name is the module itself).
_LAZY = {
    "CellOntology": "schce.ontology",
    "HCEClassifier": "schce.model",
    "HCEEnsemble": "schce.model",
    "Hierarchy": "schce.hierarchy",
    "HierarchyCycleError": "schce.hierarchy",
    "LabelMappingError": "schce.ontology",
    "load_cell_ontology": "schce.ontology",
    "majority_vote": "schce.voting",
    "propose_label_mapping": "schce.vocabulary",
    "read_label_mapping": "schce.vocabulary",
    "data": "schce.data",
    "datasets": "schce.datasets",
    "evaluation": "schce.evaluation",
    "losses": "schce.losses",
    "metrics": "schce.metrics",
    "nn": "schce.nn",
    "pl": "schce.pl",
    "train": "schce.train",
}

__all__ = sorted([*_LAZY, "settings"])

if TYPE_CHECKING:  # names for type checkers and IDEs; at run time __getattr__ loads them
    from schce import data, datasets, evaluation, losses, metrics, nn, pl, train  # noqa: F401
    from schce.hierarchy import Hierarchy, HierarchyCycleError  # noqa: F401
    from schce.model import HCEClassifier, HCEEnsemble  # noqa: F401
    from schce.ontology import CellOntology, LabelMappingError, load_cell_ontology  # noqa: F401
    from schce.vocabulary import propose_label_mapping, read_label_mapping  # noqa: F401
    from schce.voting import majority_vote  # noqa: F401


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'schce' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"schce.{name}" else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
