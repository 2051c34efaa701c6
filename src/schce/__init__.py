"""schce: cell-type annotation with the Cell Ontology and the hierarchical cross-entropy loss."""

from importlib.metadata import version as _version

__version__ = _version("schce")
