"""Free-text cell-type labels (``T_CD4``, ``NK``, ``Mono``) to Cell Ontology terms: schce proposes, the user confirms.

:func:`propose_label_mapping` suggests a CL term for every label with the reason it was chosen; the user reviews the
table (or edits a CSV of it) and passes it to :meth:`~schce.HCEClassifier.setup_anndata` as ``label_mapping``.
Nothing is guessed silently: a label only maps through the ontology itself (ID, name, synonym) or through a mapping
the user gave.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping

import pandas as pd

from schce.ontology import CellOntology, LabelMappingError, load_cell_ontology

logger = logging.getLogger(__name__)

# Abbreviations used in common references (CellTypist, Azimuth, Seurat and scClassify examples), as CL terms. A label
# matches when its tokens, in any order and case, equal an entry's tokens ("T_CD4", "CD4 T" and "cd4+ T cells").
_ABBREVIATIONS = {
    "b": "CL:0000236",  # B cell
    "t": "CL:0000084",  # T cell
    "nk": "CL:0000623",  # natural killer cell
    "dc": "CL:0000451",  # dendritic cell
    "mk": "CL:0000556",  # megakaryocyte
    "hsc": "CL:0000037",  # hematopoietic stem cell
    "hspc": "CL:0008001",  # hematopoietic precursor cell
    "mono": "CL:0000576",  # monocyte
    "cd14 mono": "CL:0001054",  # CD14-positive monocyte
    "cd16 mono": "CL:0002396",  # CD14-low, CD16-positive monocyte
    "cd4 t": "CL:0000624",  # CD4-positive, alpha-beta T cell
    "cd8 t": "CL:0000625",  # CD8-positive, alpha-beta T cell
    "cd4 naive t": "CL:0000895",  # naive thymus-derived CD4-positive, alpha-beta T cell
    "cd4 memory t": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "cd8 naive t": "CL:0000900",  # naive thymus-derived CD8-positive, alpha-beta T cell
    "cd8 memory t": "CL:0000909",  # CD8-positive, alpha-beta memory T cell
    "treg": "CL:0000815",  # regulatory T cell
    "mait": "CL:0000940",  # mucosal-associated invariant T cell
    "gdt": "CL:0000798",  # gamma-delta T cell
    "ilc": "CL:0001065",  # innate lymphoid cell
    "pdc": "CL:0000784",  # plasmacytoid dendritic cell
    "cdc": "CL:0000990",  # conventional dendritic cell
    "plasma": "CL:0000786",  # plasma cell
    "eryth": "CL:0000232",  # erythrocyte
    "mac": "CL:0000235",  # macrophage
    "endo": "CL:0000115",  # endothelial cell
    "fib": "CL:0000057",  # fibroblast
    "alpha": "CL:0000171",  # pancreatic A cell
    "beta": "CL:0000169",  # type B pancreatic cell
    "delta": "CL:0000173",  # pancreatic D cell
    "gamma": "CL:0002275",  # pancreatic PP cell
    "pp": "CL:0002275",  # pancreatic PP cell
    "epsilon": "CL:0005019",  # pancreatic epsilon cell
    "acinar": "CL:0002064",  # pancreatic acinar cell
    "ductal": "CL:0002079",  # pancreatic ductal cell
}
_WORDS = {"cells": "", "cell": "", "mem": "memory", "monocytes": "mono", "monocyte": "mono", "nai": "naive"}
MAPPING_COLUMNS = ["label", "ontology_term_id", "name", "how", "candidates"]


def _tokens(label: str) -> str:
    """Order-free key of a label: lower case, split on punctuation, '+' dropped, 'cells' and plurals folded."""
    words = re.split(r"[\s_\-/,;.()]+", label.lower().replace("+", " "))
    words = [_WORDS.get(w, w) for w in words if w]
    return " ".join(sorted(w for w in words if w))


def propose_label_mapping(labels: Iterable[str], ontology: CellOntology | str | None = None) -> pd.DataFrame:
    """Propose a Cell Ontology term for every distinct label, saying how each was found.

    Parameters
    ----------
    labels
        Labels as annotated (e.g. ``adata.obs["cell_type"]``); repeats and missing values are ignored.
    ontology
        :class:`~schce.CellOntology`, OBO path or URL; default: the embedded CL release.

    Returns
    -------
    One row per label, columns ``label``, ``ontology_term_id`` (the proposal; empty when there is none), ``name``
    (its CL name), ``how`` (``"ontology"``: an ID, name or synonym of the ontology itself; ``"abbreviation"``: a
    common abbreviation; ``"close name"``: the closest CL name, to be checked; ``"none"``) and ``candidates`` (other
    close CL names). Review it, edit what is wrong, and pass it (or a dict ``label -> CL ID``) as ``label_mapping``.
    """
    onto = load_cell_ontology(ontology)
    rows = []
    for label in dict.fromkeys(str(x) for x in labels if not pd.isna(x)):
        term, how, candidates = onto.resolve(label), "ontology", []
        if term is None and (abbrev := _ABBREVIATIONS.get(_tokens(label))) is not None:
            term, how = onto.resolve(abbrev), "abbreviation"
        if term is None:
            candidates = onto.close_terms(re.sub(r"_+", " ", label))  # T_CD4 reads as 'T CD4'
            term, how = (candidates[0], "close name") if candidates else (None, "none")
            candidates = candidates[1:]
        rows.append(
            {
                "label": label,
                "ontology_term_id": term or "",
                "name": onto.name(term) if term else "",
                "how": how,
                "candidates": "; ".join(f"{onto.name(c)} ({c})" for c in candidates),
            }
        )
    table = pd.DataFrame(rows, columns=MAPPING_COLUMNS)
    unsure = table.loc[table["how"].isin(["close name", "none"]), "label"].tolist()
    if unsure:
        logger.warning("Check these proposals before training, they are guesses or missing: %s.", ", ".join(unsure))
    return table


def read_label_mapping(mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike) -> dict[str, str]:
    """A user's label mapping as ``{label: CL ID or name}``, from a dict, a table or a CSV file.

    A table (or CSV) needs the columns ``label`` and ``ontology_term_id`` (as written by
    :func:`propose_label_mapping`); other columns are ignored.
    """
    if isinstance(mapping, str | os.PathLike):
        if not os.path.isfile(mapping):
            raise FileNotFoundError(f"No label mapping file at {mapping}.")
        mapping = pd.read_csv(mapping, dtype=str, keep_default_na=False)
    if isinstance(mapping, pd.DataFrame):
        missing = {"label", "ontology_term_id"} - set(mapping.columns)
        if missing:
            raise ValueError(
                f"The label mapping table needs the columns 'label' and 'ontology_term_id'; missing {sorted(missing)}."
            )
        labels = mapping["label"].astype(str)
        if labels.duplicated().any():
            raise ValueError(f"The label mapping lists labels twice: {sorted(set(labels[labels.duplicated()]))}.")
        mapping = dict(zip(labels, mapping["ontology_term_id"].astype(str), strict=True))
    if not isinstance(mapping, Mapping):
        raise TypeError(f"label_mapping must be a dict, a DataFrame or a CSV path, got {type(mapping).__name__}.")
    return {str(k): str(v) for k, v in mapping.items()}


def map_labels(
    labels: Iterable[str], onto: CellOntology, label_mapping: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every distinct label to a live CL term: the user's mapping first, then the ontology; all problems in one error.

    A mapped value may be a CL ID or a CL name; it must resolve in ``onto``. Labels outside the mapping go through
    :meth:`~schce.CellOntology.map_labels`, whose error (with close names) lists every label left unmapped.
    """
    values = list(dict.fromkeys(str(x) for x in labels if not pd.isna(x)))
    mapping = dict(label_mapping or {})
    result, bad = {}, []
    for label in values:
        if label in mapping:
            term = onto.resolve(mapping[label]) if mapping[label] else None
            if term is None:
                bad.append(f"  - {label!r} -> {mapping[label]!r}: not a live term of CL {onto.version}")
            else:
                result[label] = term
    rest = [v for v in values if v not in mapping]
    try:
        result.update(onto.map_labels(rest))
    except LabelMappingError as err:
        if not bad:
            raise LabelMappingError(
                f"{err}\nOr propose a mapping with schce.propose_label_mapping(labels), review it, and pass it as "
                "label_mapping=.",
                err.unmapped,
            ) from None
        bad.append(str(err))
    if bad:
        raise LabelMappingError("The label mapping does not resolve:\n" + "\n".join(bad), [])
    unused = sorted(set(mapping) - set(values))
    if unused:
        logger.warning("The label mapping has entries for labels no cell carries: %s.", ", ".join(unused))
    return {label: result[label] for label in values}
