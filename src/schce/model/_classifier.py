"""The user-facing classifier: :class:`HCEClassifier`, a thin class over its set-up, training and other mixins."""

from __future__ import annotations

import logging
from typing import Literal

import rich
import rich.pretty  # scvi-tools' view_registry uses rich.pretty without importing it
from anndata import AnnData
from scvi.model.base import BaseModelClass

from schce._constants import DEFAULT_LOSS, LOSSES
from schce.hierarchy import LABEL_SEMANTICS, Hierarchy
from schce.model._finetune import FineTuneMixin
from schce.model._inference import InferenceMixin
from schce.model._persist import PersistMixin
from schce.model._setup import SetupMixin
from schce.model._state import SetupState
from schce.model._training import TrainingMixin
from schce.nn import HCEModule, make_backbone
from schce.train._config import DEFAULT_BACKBONE_KWARGS, DEFAULT_STANDARDIZE
from schce.train._recipe import get_recipe, recipe_loss

logger = logging.getLogger(__name__)


class HCEClassifier(SetupMixin, TrainingMixin, FineTuneMixin, InferenceMixin, PersistMixin, BaseModelClass):
    """Cell-type classifier over Cell Ontology labels, trained with the hierarchical cross-entropy loss.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        scvi-tools' registry of a model built without data (used by :meth:`load` and the file constructors; leave
        ``None``).
    backbone
        ``"mlp"``, ``"linear"`` (a logistic regression, fitted by full-batch L-BFGS; see :meth:`train`) or
        ``"tabnet"``.
    recipe
        ``None``: the package defaults (tuned on held-out batches of real PBMCs); ``"sctab"``: the published scTab /
        HCE-paper training: scTab's architecture and the published loss and, in :meth:`train`, its class weights,
        augmentation (MLP, TabNet), AdamW settings, StepLR(0.9), 50 epochs, batch 2048, donor split and model
        selection (see :data:`schce.train.RECIPES` and :doc:`/training`). Explicit arguments override either.
    loss
        ``"hce-aware"`` (default without a recipe): hierarchical cross-entropy whose acceptable labels follow what
        each annotation can mean (see ``label_semantics``); ``"hce"``: plain hierarchical cross-entropy (a label's
        probability includes all its descendants'); ``"ce"``: flat cross-entropy. See :doc:`/method`. With
        ``recipe="sctab"`` the default is the published loss, ``"hce"`` in the ``"reference"`` form; ``"ce"`` is
        allowed, ``"hce-aware"`` raises (it is not a published loss).
    label_semantics
        For ``loss="hce-aware"``: ``"auto"`` reads a label as its subtree minus the subtrees of the other labels
        that the same annotation source (the ``batch_key`` of :meth:`setup_anndata`, or the whole training set
        when none) also uses below it; ``"inclusive"`` always as its whole subtree (= ``"hce"``);
        ``"exclusive"`` as the label alone (= ``"ce"``).
    hce_form
        ``"log"``: exact log-space HCE (default); ``"reference"``: the published ``log(q + 1e-6)`` form (default
        with ``recipe="sctab"``).
    standardize
        Whether the first :meth:`train` scales every gene to zero mean and unit variance over the training cells
        (after the log normalisation; clipped at ±10, as :func:`scanpy.pp.scale` with ``max_value=10``). The mean
        and scale are stored with the weights and applied to every query. Default: ``True`` for the MLP and the
        linear model; ``False`` for TabNet (its input batch norm standardises already) and ``recipe="sctab"``
        (scTab's models read the log-normalised values directly). See :doc:`/training`.
    **backbone_kwargs
        Backbone hyperparameters. The MLP defaults to ``n_hidden=256, n_layers=3, dropout=0.2, input_dropout=0.2``;
        scTab's architecture is ``n_hidden=128, n_layers=8, dropout=0.1, input_dropout=0`` (the defaults of
        :class:`schce.nn.MLP`). ``wide=True`` adds a linear map of the input genes to the MLP's logits (wide & deep,
        off by default).
    setup_state
        With ``registry``: the model's :class:`~schce.model.SetupState` (labels, hierarchy, genes), which a model
        built on ``adata`` takes from :meth:`setup_anndata` (used by :meth:`load`; leave ``None``).

    Examples
    --------
    >>> schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    >>> model = schce.HCEClassifier(adata)
    >>> model.train(max_epochs=50, seed=0)
    >>> model.predict(query)
    >>> sc.pl.umap(query, color="schce_prediction")
    """

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        backbone: Literal["mlp", "linear", "tabnet"] = "mlp",
        loss: Literal["hce-aware", "hce", "ce"] | None = None,
        label_semantics: Literal["auto", "inclusive", "exclusive"] = "auto",
        hce_form: Literal["log", "reference"] | None = None,
        recipe: Literal["sctab"] | None = None,
        standardize: bool | None = None,
        *,
        setup_state: SetupState | None = None,
        **backbone_kwargs,
    ):
        super().__init__(adata, registry)
        if adata is not None:
            self._setup = self._registered_setup(self.adata_manager)
        elif setup_state is None:
            raise ValueError(
                "A model built from a registry needs its setup_state (HCEClassifier.load passes both); to build one "
                "on data, pass an AnnData registered with HCEClassifier.setup_anndata."
            )
        else:
            self._setup = setup_state.copy()
        loss, hce_form = recipe_loss(recipe, loss, hce_form, DEFAULT_LOSS)  # saved resolved, below
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
        if label_semantics not in LABEL_SEMANTICS:
            raise ValueError(f"label_semantics must be one of {LABEL_SEMANTICS}, got {label_semantics!r}.")
        if hce_form not in ("log", "reference"):
            raise ValueError(f"hce_form must be 'log' or 'reference', got {hce_form!r}.")
        setup = self._setup
        self.hierarchy = Hierarchy.from_dict(setup.hierarchy)
        self.genes: list[str] = list(setup.genes)
        self.backbone, self.loss, self.hce_form, self.recipe = backbone, loss, hce_form, recipe
        self.label_semantics = label_semantics
        if standardize is None:
            standardize = recipe is None and DEFAULT_STANDARDIZE.get(backbone, False)
        self.standardize = bool(standardize)
        base = get_recipe(recipe, backbone).backbone_kwargs if recipe else DEFAULT_BACKBONE_KWARGS.get(backbone, {})
        arch = {**base, **backbone_kwargs}
        self.module = HCEModule(make_backbone(backbone, len(self.genes), self.hierarchy.n_labels, **arch))
        self._model_summary_string = (
            f"HCEClassifier: backbone={backbone}({', '.join(f'{k}={v!r}' for k, v in arch.items())}), "
            f"loss={loss}"
            + (f" ({label_semantics})" if loss == "hce-aware" else "")
            + ", "
            + (f"recipe={recipe}, " if recipe else "")
            + f"{self.hierarchy.n_labels} labels (ontology {self.hierarchy.version}), {len(self.genes)} genes "
            f"({setup.gene_id_type}), training input: "
            + ("raw counts, normalised in the module" if setup.normalize else "used as given")
        )
        self.temperature_ = 1.0
        self.best_epoch_ = self.optimizer_ = None
        backbone_kwargs = arch  # saved in full, so later changes of the defaults leave saved models as they were
        del setup_state  # held as the model's own set-up, saved apart from the init parameters
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------------ display
    def view_anndata_setup(self, adata: AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print how the training AnnData was registered (works for loaded models too)."""
        if adata is None and self.adata is None:
            setup = self.registry_["setup_args"]
            lines = [f"{type(self).__name__} setup (loaded model, no AnnData attached):"]
            lines += [f"  {k}: {v!r}" for k, v in setup.items()]
            lines.append(f"  labels: {self.hierarchy.n_labels} ({', '.join(self.hierarchy.names()[:5])}, ...)")
            lines.append(f"  genes: {len(self.genes)}")
            rich.print("\n".join(lines))
            return
        super().view_anndata_setup(adata, hide_state_registries)

    def __repr__(self) -> str:
        return self.summary_string
