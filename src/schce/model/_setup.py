"""Registering training data: :meth:`~schce.HCEClassifier.setup_anndata` and ``setup_mudata``."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import (
    CategoricalObsField,
    LayerField,
    MuDataCategoricalObsField,
    MuDataLayerField,
)

from schce._checks import check_setup_obs, obs_restored_on_error
from schce.data._expression import check_expression, get_matrix, resolve_normalize
from schce.data._genes import gene_id_type, model_genes
from schce.hierarchy import Hierarchy
from schce.model._state import SetupState
from schce.ontology import load_cell_ontology
from schce.vocabulary import map_labels, read_label_mapping

logger = logging.getLogger(__name__)
# schce's set-up of each AnnData registered by setup_anndata / setup_mudata, by the UUID scvi-tools gives the data
# (as scvi-tools keeps its managers); a model built on the data copies it and holds its own from then on.
_REGISTERED: dict[str, SetupState] = {}
CUSTOM = "custom hierarchy"  # ontology_source of a model set up with a user's hierarchy instead of the Cell Ontology


class SetupMixin:
    """Registration of AnnData / MuData and of models built from files."""

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        labels_key: str,
        layer: str | None = None,
        batch_key: str | None = None,
        ontology=None,
        normalize: bool | Literal["auto"] = "auto",
        label_mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike | None = None,
        hierarchy: Hierarchy | Mapping[str, str | Sequence[str] | None] | None = None,
        **kwargs,
    ) -> None:
        """Register ``adata`` for training.

        Everything is checked before anything is written; on success scvi-tools adds its registry columns
        (``_scvi_labels``, ``_scvi_batch``) to ``adata.obs``.

        Parameters
        ----------
        adata
            Cells × genes. ``var_names`` are the model's genes (Ensembl IDs preferred, symbols work).
        labels_key
            ``obs`` column of cell types: CL IDs (``CL:0000084``) or CL names / synonyms (``T cell``).
        layer
            Layer with the expression; default ``adata.X``. Raw counts are preferred.
        batch_key
            ``obs`` column naming each cell's batch or annotation source.
        ontology
            :class:`~schce.ontology.CellOntology`, OBO path or URL; default: the embedded CL release.
        normalize
            ``"auto"``: normalise (size factor to 1e4, log1p) raw counts and count-like values (normalised without
            log, or counts times a factor), use log1p-normalised values as they are, refuse scaled (negative)
            values; what was seen is logged (see :doc:`/checks`). ``True`` / ``False`` to force.
        label_mapping
            Free-text labels (``T_CD4``, ``Mono``) to CL IDs or names: a dict, a reviewed table of
            :func:`~schce.propose_label_mapping` (columns ``label``, ``ontology_term_id``) or a CSV of it. Labels it
            does not list must be CL IDs, names or synonyms.
        hierarchy
            Train without the Cell Ontology: a :class:`~schce.Hierarchy` whose terms include every label, or a dict
            ``{label: parent}`` / ``{label: [parents]}`` (``None`` for a top-level label) over your own labels.
            The model's labels are then the values of ``obs[labels_key]`` as they are; ``ontology`` and
            ``label_mapping`` do not apply.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.
        """
        for key, what in ((labels_key, "labels_key"), (batch_key, "batch_key")):
            if key is not None and key not in adata.obs.columns:
                raise KeyError(
                    f"{what}={key!r} is not a column of adata.obs. Available columns: {list(adata.obs.columns)}."
                )
        check_setup_obs(adata, batch_key)  # missing batches, a user's _scvi_labels column: before any change
        state = cls._setup_state(
            adata, adata.obs[labels_key], labels_key, layer, ontology, normalize, label_mapping, hierarchy
        )

        setup_method_args = cls._get_setup_method_args(**locals())
        setup_method_args["setup_args"] = {
            "labels_key": labels_key,
            "layer": layer,
            "batch_key": batch_key,
            # a path or URL is kept so evaluate() can reload it; an in-memory ontology is recorded by its source
            "ontology": os.fspath(ontology) if isinstance(ontology, str | os.PathLike) else None,
            "normalize": normalize,
            **_vocabulary_args(state, label_mapping),
        }
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=False),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with obs_restored_on_error(adata), _small_groups_named(adata.obs, labels_key, batch_key):
            manager.register_fields(adata, **kwargs)
        cls._register_setup(manager, state)

    @classmethod
    def setup_mudata(
        cls,
        mdata: MuData,
        labels_key: str,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        ontology=None,
        normalize: bool | Literal["auto"] = "auto",
        modalities: dict[str, str] | None = None,
        label_mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike | None = None,
        hierarchy: Hierarchy | Mapping[str, str | Sequence[str] | None] | None = None,
        **kwargs,
    ) -> None:
        """Register a :class:`~mudata.MuData` for training on its RNA modality.

        As :meth:`setup_anndata`, with the expression read from the modality named by ``modalities["rna_layer"]``.
        Other modalities (protein, ATAC) are left alone. :meth:`predict` on a MuData writes into the RNA modality
        and refreshes ``mdata.obs`` (``mdata.obs["rna:schce_prediction"]``).

        Parameters
        ----------
        mdata
            MuData whose RNA modality holds the same cells as ``mdata`` (``muon.pp.intersect_obs`` makes it so).
        labels_key
            ``obs`` column of cell types (CL IDs or names), in ``mdata.obs`` or in the modality named by
            ``modalities["labels_key"]``.
        rna_layer
            Layer of the RNA modality with the expression; default its ``X``.
        batch_key
            ``obs`` column of batches, in ``mdata.obs`` or in the modality named by ``modalities["batch_key"]``.
        ontology, normalize, label_mapping, hierarchy
            As in :meth:`setup_anndata`.
        modalities
            Which modality each argument refers to, as in scvi-tools: ``{"rna_layer": "rna"}`` (the default) and
            optionally ``"labels_key"`` / ``"batch_key"`` (absent: the column is in ``mdata.obs``).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields`.

        Examples
        --------
        >>> schce.HCEClassifier.setup_mudata(mdata, "cell_type", modalities={"rna_layer": "rna", "labels_key": "rna"})
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(mdata, MuData):
            raise TypeError(f"setup_mudata takes a MuData, got {type(mdata).__name__}; use setup_anndata for AnnData.")
        modalities = dict({"rna_layer": "rna"} if modalities is None else modalities)
        mods = cls._create_modalities_attr_dict(modalities, setup_method_args)
        for arg, mod in mods.items():
            if mod is not None and mod not in mdata.mod:
                raise KeyError(f"modalities[{arg!r}]={mod!r} is not a modality of mdata; it has {list(mdata.mod)}.")
        if mods.rna_layer is None:
            raise ValueError('Name the RNA modality: modalities={"rna_layer": "rna"}.')
        rna = mdata.mod[mods.rna_layer]
        if rna.n_obs != mdata.n_obs or not rna.obs_names.equals(mdata.obs_names):
            raise ValueError(
                f"The RNA modality {mods.rna_layer!r} has {rna.n_obs} of mdata's {mdata.n_obs} cells (or another "
                "order); keep the cells measured in every modality first (muon.pp.intersect_obs(mdata))."
            )
        obs_of, places = {}, {}
        for key, arg in ((labels_key, "labels_key"), (batch_key, "batch_key")):
            obs, where = (mdata.obs, "mdata.obs") if mods[arg] is None else (mdata[mods[arg]].obs, mods[arg])
            if key is not None and key not in obs.columns:
                hint = [m for m in mdata.mod if key in mdata.mod[m].obs.columns]
                raise KeyError(
                    f"{arg}={key!r} is not a column of {where}"
                    + (f"; it is in modality {hint[0]!r}: add {{{arg!r}: {hint[0]!r}}} to modalities." if hint else ".")
                )
            obs_of[arg] = obs
            places[arg] = (obs, "mdata.obs" if mods[arg] is None else f"mdata[{mods[arg]!r}].obs")
        check_setup_obs(mdata, batch_key, places)  # as setup_anndata: before any change
        raw = obs_of["labels_key"][labels_key]
        state = cls._setup_state(rna, raw, labels_key, rna_layer, ontology, normalize, label_mapping, hierarchy)
        # Every modality's features as registered, so a loaded model knows them without the data.
        state.modality_genes = {m: [str(v) for v in mdata.mod[m].var_names] for m in mdata.mod}
        setup_method_args["setup_args"]["ontology"] = (
            os.fspath(ontology) if isinstance(ontology, str | os.PathLike) else None
        )
        setup_method_args["setup_args"]["modalities"] = modalities
        setup_method_args["setup_args"].update(_vocabulary_args(state, label_mapping))
        fields = [
            MuDataLayerField(REGISTRY_KEYS.X_KEY, rna_layer, mod_key=mods.rna_layer, is_count_data=False),
            MuDataCategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key, mod_key=mods.labels_key),
            MuDataCategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=mods.batch_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        with ExitStack() as restore:  # a failure leaves every obs scvi-tools writes to as it was
            for data in (mdata, *mdata.mod.values()):
                restore.enter_context(obs_restored_on_error(data))
            restore.enter_context(_small_groups_named(obs_of["labels_key"], labels_key, None))
            manager.register_fields(mdata, **kwargs)
        cls._register_setup(manager, state)

    @staticmethod
    def _setup_state(
        adata: AnnData,
        raw: pd.Series,
        labels_key: str,
        layer: str | None,
        ontology,
        normalize,
        label_mapping=None,
        hierarchy=None,
    ) -> SetupState:
        """Check the expression and labels of the training cells; schce's section of the registry."""
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(f"adata is empty ({adata.n_obs} cells × {adata.n_vars} genes); nothing to train on.")
        X = get_matrix(adata, layer)
        if raw.isna().any():
            raise ValueError(
                f"{int(raw.isna().sum())} cell(s) have no label in obs[{labels_key!r}]. Drop them "
                "(adata = adata[adata.obs[key].notna()].copy()) before setup."
            )
        values = raw.astype(str).unique()
        if hierarchy is not None:
            if label_mapping is not None:
                raise ValueError(
                    "Pass either hierarchy= (your own labels and their parents) or label_mapping= (labels to Cell "
                    "Ontology terms), not both."
                )
            hier, source = custom_hierarchy(hierarchy, values, labels_key), CUSTOM
            label_map = {str(v): str(v) for v in values}
        else:
            onto = load_cell_ontology(ontology)
            mapping = read_label_mapping(label_mapping) if label_mapping is not None else None
            label_map = map_labels(values, onto, mapping)
            hier, source = None, onto.source
        label_ids = sorted(set(label_map.values()))
        if len(label_ids) < 2:
            raise ValueError(
                f"obs[{labels_key!r}] has a single cell type ({label_ids[0]}); a classifier needs at least two."
            )
        if hier is None:
            hier = Hierarchy.from_ontology(label_ids, onto)
        where = f"adata.layers[{layer!r}]" if layer else "adata.X"
        summary = check_expression(X, adata.n_obs, where)
        normalize_used = resolve_normalize(normalize, summary, where)
        genes = model_genes(adata.var_names)  # duplicated genes are refused, listed
        return SetupState(
            label_map={str(k): v for k, v in label_map.items()},
            hierarchy=hier.to_dict(),
            genes=[str(g) for g in genes],
            gene_id_type=gene_id_type(genes),
            normalize=bool(normalize_used),
            ontology_source=source,
            expression=summary.kind,  # what the training values looked like; predict prepares queries alike
        )

    @classmethod
    def _register_setup(cls, manager: AnnDataManager, state: SetupState) -> None:
        """Keep scvi-tools' manager of the registered fields and, beside it, schce's set-up of the same data."""
        cls.register_manager(manager)
        _REGISTERED[manager.adata_uuid] = state

    @classmethod
    def _registered_setup(cls, manager: AnnDataManager) -> SetupState:
        """The set-up that :meth:`setup_anndata` / ``setup_mudata`` recorded with ``manager`` (a copy)."""
        if manager.adata_uuid not in _REGISTERED:
            raise ValueError(
                f"The data was registered by another model class, not by {cls.__name__}; call "
                f"{cls.__name__}.setup_anndata(adata, labels_key=...) first."
            )
        return _REGISTERED[manager.adata_uuid].copy()

    @staticmethod
    def _state_without_data(genes, labels, onto, hierarchy: Hierarchy, normalize: bool) -> SetupState:
        """The set-up of a model built from files: its genes, its labels (CL IDs, in order) and its hierarchy."""
        label_map = map_labels(np.asarray(labels, dtype=object), onto, None)  # refuses unknown or obsolete terms
        if len(set(label_map.values())) < 2:
            raise ValueError(f"A classifier needs at least two labels, got {list(labels)}.")
        genes = model_genes(pd.Index([str(g) for g in genes]))  # duplicated genes are refused, listed
        return SetupState(
            label_map={str(k): v for k, v in label_map.items()},
            hierarchy=hierarchy.to_dict(),
            genes=[str(g) for g in genes],
            gene_id_type=gene_id_type(genes),
            normalize=bool(normalize),
            ontology_source=onto.source,
        )

    @classmethod
    def _registry_without_data(cls, constructor: str, normalize: bool) -> dict:
        """scvi-tools' registry of a model built from files: how it was made, and no registered fields."""
        from scvi import __version__ as scvi_version

        args = {"labels_key": None, "layer": None, "batch_key": None, "ontology": None, "normalize": normalize}
        return {
            "scvi_version": scvi_version,
            "model_name": cls.__name__,
            "setup_method_name": constructor,
            "setup_args": {**args, "label_mapping": None, "hierarchy": None},
            "field_registries": {},
        }

    @property
    def setup_state(self) -> SetupState:
        """Schce's set-up of this model (labels, hierarchy, genes, normalisation), typed; a copy."""
        return self._setup.copy()

    def _ontology(self, ontology=None):
        """``ontology`` loaded, else the one set up with (when it was a path or URL), else the embedded CL release."""
        return load_cell_ontology(ontology if ontology is not None else self.registry_["setup_args"].get("ontology"))


def custom_hierarchy(hierarchy, values, labels_key: str) -> Hierarchy:
    """The model's hierarchy over the label ``values`` (sorted) from a user's :class:`Hierarchy` or parent dict."""
    labels = sorted(str(v) for v in values)
    if isinstance(hierarchy, Hierarchy):
        edges, names, version, known = (
            hierarchy.edges(),
            {t: hierarchy.name(t) for t in hierarchy.terms},
            hierarchy.version,
            set(hierarchy.terms),
        )
    elif isinstance(hierarchy, Mapping):
        edges = []
        for child, parents in hierarchy.items():
            if parents is None or (not isinstance(parents, str) and len(parents) == 0):
                continue
            for parent in [parents] if isinstance(parents, str) else parents:
                edges.append((str(parent), str(child)))
        names, version = None, CUSTOM
        known = {str(k) for k in hierarchy} | {p for p, _ in edges}
    else:
        raise TypeError(
            "hierarchy must be a schce.Hierarchy or a dict {label: parent or [parents]}, got "
            f"{type(hierarchy).__name__}."
        )
    missing = [label for label in labels if label not in known]
    if missing:
        raise ValueError(
            f"{len(missing)} label(s) of obs[{labels_key!r}] are not in the hierarchy: {missing}. Add each with its "
            "parent (None for a top-level label)."
        )
    return Hierarchy(labels, edges, names=names, version=version)


@contextmanager
def _small_groups_named(obs: pd.DataFrame, labels_key: str, batch_key: str | None):
    """Replace scvi-tools' "Category 6 in adata.obs['_scvi_labels'] has fewer than 3 cells" by one naming them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*has fewer than 3 cells.*", category=UserWarning)
        yield
    for key in (labels_key, batch_key):
        if key is None:
            continue
        counts = obs[key].astype(str).value_counts()
        small = counts[counts < 3]
        if len(small):
            logger.warning(
                "obs[%r] has fewer than 3 cells of: %s. They barely train and cannot be validated; merge them into "
                "a broader label or drop them if that is not intended.",
                key,
                ", ".join(f"{name!r} ({n})" for name, n in small.items()),
            )


def _vocabulary_args(state: SetupState, label_mapping) -> dict:
    """``label_mapping`` and ``hierarchy`` as plain data for the registry's setup_args (a reload sets up alike)."""
    if state.ontology_source == CUSTOM:
        hier = Hierarchy.from_dict(state.hierarchy)
        return {"label_mapping": None, "hierarchy": {t: list(hier.parents(t)) for t in hier.terms}}
    return {"label_mapping": dict(state.label_map) if label_mapping is not None else None, "hierarchy": None}
