"""What the ontology modules share: constants, the label-mapping error and small helpers."""

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: Synonym scopes of the OBO format; ``""`` marks a synonym whose scope the source does not record.
SYNONYM_SCOPES = ("EXACT", "RELATED", "NARROW", "BROAD", "")

_ROOT = "CL:0000000"
_URL_PREFIXES = ("http://", "https://", "ftp://")
# CL IDs are also written as CL_0000084 or as full PURLs (http://purl.obolibrary.org/obo/CL_0000084) in the wild.
_ID_RE = re.compile(r"^(?:\S*[/#])?CL[:_](\d{7})$", re.IGNORECASE)
_SYNONYM_RE = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*([A-Za-z_]+)?')
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DICT_FORMAT = "schce.CellOntology"
_DICT_FORMAT_VERSION = 1
_FIX_HINT = (
    "To fix this, use CL IDs such as 'CL:0000084' or exact CL names or synonyms such as 'T cell', e.g. by renaming "
    "the labels before training; if the labels come from a newer CL release, pass ontology= the path or URL of a "
    "newer CL OBO file (e.g. https://purl.obolibrary.org/obo/cl/cl-simple.obo)."
)


class LabelMappingError(ValueError):
    """Some cell-type labels could not be mapped to live Cell Ontology terms.

    Parameters
    ----------
    message
        The full error message (lists every unmapped label with close CL names).
    unmapped
        The labels that could not be mapped, sorted.

    """

    def __init__(self, message: str, unmapped: Iterable[str] | None = None):
        super().__init__(message)
        # Optional so that the exception survives pickling, which re-creates it from the message alone.
        self.unmapped: list[str] = list(unmapped) if unmapped is not None else []


def _normalise(text: str) -> str:
    """Case-fold and collapse whitespace so that names match regardless of spacing and case."""
    return " ".join(text.split()).casefold()


def _is_null(value: Any) -> bool:
    """Whether ``value`` is a missing value (None, NaN, ``pd.NA``, ``pd.NaT``) without importing pandas."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in {"NAType", "NaTType"}


def _topological_order(parents: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Terms ordered so that every term comes after all its parents (Kahn's algorithm; the graph is acyclic)."""
    pending = {term: len(ps) for term, ps in parents.items()}
    children: dict[str, list[str]] = {term: [] for term in parents}
    for term, ps in parents.items():
        for parent in ps:
            children[parent].append(term)
    ready = sorted(term for term, n in pending.items() if n == 0)
    order: list[str] = []
    while ready:
        term = ready.pop()
        order.append(term)
        for child in children[term]:
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    return order
