"""schce's own set-up of a model, typed: the model's source of truth for labels, hierarchy, genes and input handling.

scvi-tools' registry describes only the fields of a registered AnnData; this state is held by the model and saved as
``setup`` in ``schce.json`` (files of format 2 and earlier kept it in the registry under ``SETUP_KEY``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields


@dataclass
class SetupState:
    """The labels, hierarchy, genes and input handling a model was set up with.

    Attributes
    ----------
    label_map
        Each training label value (CL ID or name) to its CL ID.
    hierarchy
        The model's :class:`~schce.hierarchy.Hierarchy` as :meth:`~schce.hierarchy.Hierarchy.to_dict`.
    genes
        The model's input genes (Ensembl versions stripped).
    gene_id_type
        ``"Ensembl IDs"`` or ``"symbols"``.
    normalize
        Whether the module normalises raw counts.
    ontology_source
        Where the ontology came from.
    modality_genes
        For a MuData: every modality's features at set-up.
    expression
        What the training values looked like (raw counts, log1p, ...; see :doc:`/checks`), so queries are prepared
        alike.
    sctab_store
        The store a :meth:`~schce.HCEClassifier.from_sctab_store` model was built for.
    fine_tuning
        One record per :meth:`~schce.HCEClassifier.fine_tune` call.
    """

    label_map: dict[str, str]
    hierarchy: dict
    genes: list[str]
    gene_id_type: str
    normalize: bool
    ontology_source: str | None = None
    modality_genes: dict[str, list[str]] | None = None
    sctab_store: str | None = None
    expression: str | None = None
    fine_tuning: list[dict] = field(default_factory=list)

    @classmethod
    def from_dict(cls, stored: dict) -> SetupState:
        """The state described by :meth:`to_dict` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**copy.deepcopy({k: v for k, v in stored.items() if k in names}))

    def copy(self) -> SetupState:
        """An independent copy (change it, then hand it back to the model)."""
        return copy.deepcopy(self)

    def to_dict(self) -> dict:
        """Plain data for ``schce.json``; optional entries only when set (saved models keep their earlier layout)."""
        out = asdict(self)
        for key in ("modality_genes", "sctab_store", "expression"):
            if out[key] is None:
                del out[key]
        if not out["fine_tuning"]:
            del out["fine_tuning"]
        return out
