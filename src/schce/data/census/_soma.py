"""The census layout: the extra's imports, the model's genes and labels in a census, value filters."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from schce.data._genes import GeneAligner

logger = logging.getLogger(__name__)


class HCEClassifier(Protocol):
    """What the census functions read of a :class:`~schce.HCEClassifier`: its genes, labels and set-up.

    Declared here rather than imported, so the data layer never imports the model.
    """

    genes: list[str]
    hierarchy: Any
    registry_: dict
    setup_state: Any


#: The 10x protocols scTab kept when it built its training data from the census (release 2023-05-15).
SCTAB_ASSAYS = (
    "10x 5' v2",
    "10x 3' v3",
    "10x 3' v2",
    "10x 5' v1",
    "10x 3' v1",
    "10x 3' transcription profiling",
    "10x 5' transcription profiling",
)
LABEL_COLUMN = "cell_type_ontology_term_id"
_INSTALL_HINT = "The census functions need the census extra: pip install 'schce[census]'."


def _require_soma():
    """Import tiledbsoma, or explain how to install it."""
    try:
        import tiledbsoma
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return tiledbsoma


def _require_soma_ml():
    """Import tiledbsoma_ml, or explain how to install it."""
    try:
        import tiledbsoma_ml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return tiledbsoma_ml


def _child(collection, key: str, where: str):
    """``collection[key]`` with an error naming the missing part of the census layout."""
    if key not in collection:
        raise KeyError(
            f"{where} has no {key!r}; found {sorted(collection.keys())}. Pass an opened census "
            "(cellxgene_census.open_soma(census_version=...)) or a SOMA collection in the same layout."
        )
    return collection[key]


# ---------------------------------------------------------------------------------------------------------- queries
def _gene_column(model: HCEClassifier, gene_column: str | None) -> str:
    """The census ``var`` column holding the model's gene identifiers."""
    if gene_column is not None:
        return gene_column
    id_type = model.setup_state.gene_id_type
    return "feature_id" if id_type == "Ensembl IDs" else "feature_name"


def _cell_type_terms(model: HCEClassifier, include_descendants: bool, ontology) -> list[str]:
    """The model's labels and, with ``include_descendants``, every ontology descendant of them."""
    labels = set(model.hierarchy.labels)
    if not include_descendants:
        return sorted(labels)
    from schce.ontology import load_cell_ontology

    onto = load_cell_ontology(ontology if ontology is not None else model.registry_["setup_args"].get("ontology"))
    terms = set(labels)
    for label in labels:
        if label in onto:
            terms |= onto.descendants(label)
    return sorted(terms)


def _value_filter(
    terms: Sequence[str], primary_only: bool, assays: Sequence[str] | None, obs_value_filter: str | None
) -> str:
    """One SOMA value filter: scTab's filters, the cell types and the user's own filter."""
    parts = []
    if primary_only:
        parts.append("is_primary_data == True")
    if assays:
        parts.append(f"assay in {list(assays)}")
    parts.append(f"{LABEL_COLUMN} in {list(terms)}")
    if obs_value_filter:
        parts.append(obs_value_filter)
    return " and ".join(f"({p})" for p in parts)


def _experiment(census, organism: str, measurement_name: str, X_name: str):
    """The organism's experiment, checked to hold the measurement and X layer."""
    data = _child(census, "census_data", "The census")
    exp = _child(data, organism, "census_data")
    ms = _child(exp.ms, measurement_name, f"census_data/{organism}.ms")
    _child(ms.X, X_name, f"census_data/{organism}.ms[{measurement_name!r}].X")
    return exp


def _experiment_of(census, tiledbsoma, organism: str, measurement_name: str, X_name: str):
    """``census`` itself when it is an experiment (checked to hold the layer), else its organism's experiment."""
    if isinstance(census, tiledbsoma.Experiment):
        _child(_child(census.ms, measurement_name, "experiment.ms").X, X_name, f"ms[{measurement_name!r}].X")
        return census
    return _experiment(census, organism, measurement_name, X_name)


class _GeneMap:
    """Census ``var`` rows of the model's genes: their joinids and their positions in the model's input."""

    def __init__(self, exp, measurement_name: str, model: HCEClassifier, gene_column: str | None):
        column = _gene_column(model, gene_column)
        var_df = exp.ms[measurement_name].var
        if column not in var_df.schema.names:
            raise KeyError(
                f"The census var has no column {column!r}; columns: {var_df.schema.names}. Pass gene_column= "
                "naming the column that holds the model's gene identifiers."
            )
        names = [c for c in ("feature_id", "feature_name") if c in var_df.schema.names and c != column]
        var = var_df.read(column_names=["soma_joinid", column, *names]).concat().to_pandas()
        aligner = GeneAligner(model.genes, var[column].astype(str).to_numpy(), where=f"census var[{column!r}]")
        found = aligner.index >= 0
        self.column = column
        self.aligner = aligner
        self.n_model = len(model.genes)
        #: Model input positions of the found genes, and their census var joinids (same order).
        self.positions = np.flatnonzero(found)
        self.joinids = var["soma_joinid"].to_numpy()[aligner.index[found]].astype(np.int64)
        # var frame for the query AnnData: one row per model gene, census names where found.
        self.var = pd.DataFrame(index=pd.Index([str(g) for g in model.genes]))
        for c in (column, *names):
            values = np.full(self.n_model, None, dtype=object)
            values[found] = var[c].astype(str).to_numpy()[aligner.index[found]]
            self.var[c] = values
        self.var["in_census"] = found
