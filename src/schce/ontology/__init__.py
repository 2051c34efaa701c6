"""The Cell Ontology (CL): live terms, the ``is_a`` hierarchy, names, synonyms and obsolete terms.

:func:`load_cell_ontology` reads the CL release embedded in ``cellxgene-ontology-guide`` (the default, works offline)
or a CL file in OBO format (path or URL). Both give a :class:`CellOntology`, an immutable view that can also be built
from plain data, saved with a model (:meth:`CellOntology.to_dict`) and used to map free-text cell-type labels to CL
IDs (:meth:`CellOntology.resolve`, :meth:`CellOntology.map_labels`).
"""

from schce.ontology._base import SYNONYM_SCOPES, LabelMappingError
from schce.ontology._core import CellOntology
from schce.ontology._load import load_cell_ontology

__all__ = ["SYNONYM_SCOPES", "CellOntology", "LabelMappingError", "load_cell_ontology"]
