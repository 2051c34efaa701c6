"""schce's own set-up of a model, typed, beside scvi-tools' registry fields (saved in the registry under SETUP_KEY)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from schce._constants import SETUP_KEY


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
    def read(cls, registry: dict) -> SetupState:
        """The state recorded in ``registry`` (a copy: change it, then :meth:`write`)."""
        stored = registry[SETUP_KEY]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in names})

    def to_dict(self) -> dict:
        """Plain data for the registry; optional entries only when set (saved models keep their earlier layout)."""
        out = asdict(self)
        for key in ("modality_genes", "sctab_store", "expression"):
            if out[key] is None:
                del out[key]
        if not out["fine_tuning"]:
            del out["fine_tuning"]
        return out

    def write(self, registry: dict) -> None:
        """Record this state in ``registry``."""
        registry[SETUP_KEY] = self.to_dict()
