"""Persistence: :meth:`~schce.HCEClassifier.save`, ``load`` and the constructors from scTab files."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData

from schce import _io, _model_file
from schce._constants import DEFAULT_LOSS
from schce.data._genes import strip_ensembl_version
from schce.data.sctab._format import cl_label_ids
from schce.model._state import SetupState
from schce.ontology import load_cell_ontology

if TYPE_CHECKING:
    from schce.model._classifier import HCEClassifier

logger = logging.getLogger(__name__)

# The loss of schce's own store model (from_sctab_store without a recipe).
STORE_LOSS = DEFAULT_LOSS  # schce's own store model; recipe="sctab" gives the published loss


def torch_device(accelerator: str = "auto", device: int | str = "auto") -> torch.device:
    """The one torch device of ``accelerator`` / ``device`` (``"auto"``: the first GPU when there is one)."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator must be 'auto', 'cpu', 'gpu' or 'cuda', got {accelerator!r}.")
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r} needs a CUDA GPU, and none is available; pass 'cpu'.")
    index = 0 if device == "auto" else int(device)
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"device={device!r} is not one of the {torch.cuda.device_count()} GPU(s).")
    return torch.device("cuda", index)


def _check_same_genes(adata, registry: dict, expected: list[str]) -> None:
    """``adata`` (its RNA modality for a MuData) must hold the saved model's genes in the model's order."""
    if not registry.get("field_registries"):
        raise ValueError(
            f"The model was built from files ({registry.get('setup_method_name')}), not on registered data, so there "
            "is no set-up to register adata with. Load it without adata and pass the data to predict() or "
            "evaluate(), which align the genes."
        )
    rna = adata
    if isinstance(adata, MuData):
        rna = adata.mod[(registry["setup_args"].get("modalities") or {}).get("rna_layer", "rna")]
    genes = [str(g) for g in strip_ensembl_version(rna.var_names)]
    if genes != expected:
        shared = len(set(genes) & set(expected))
        raise ValueError(
            f"adata's genes are not the model's ({shared} of the model's {len(expected)} genes are among adata's "
            f"{len(genes)}, or their order differs). Attach only data laid out as the training data; to predict on "
            f"other data, load without adata and call model.predict(adata), which aligns genes."
        )


class PersistMixin:
    """Saving, loading and building models from published files."""

    # ------------------------------------------------------------------ persistence
    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
    ) -> None:
        """Save the model to a directory, atomically.

        Writes ``model.pt`` (weights only) and ``schce.json`` (labels, hierarchy, genes, setup, history). The
        signature is scvi-tools' :meth:`~scvi.model.base.BaseModelClass.save`.

        Parameters
        ----------
        dir_path
            Target directory.
        prefix
            Prepended to the file names (``<prefix>model.pt``, ``<prefix>schce.json``), so one folder can hold
            several models: they are written beside whatever the folder holds, which is never touched. ``None``: the
            directory is the model's.
        overwrite
            Without ``prefix``: replace an existing directory, only when it holds nothing but schce's model files
            (the user's files are never deleted). With ``prefix``: replace that prefix's files.
        save_anndata
            Also write the registered AnnData as ``adata.h5ad`` (``<prefix>adata.h5ad``).

        Under distributed training (``strategy="ddp"``) only rank 0 writes; the other ranks return.
        """
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        from schce import __version__

        if getattr(rank_zero_only, "rank", 0) != 0:
            return

        meta = {
            "format": _io.FORMAT,
            "format_version": _io.FORMAT_VERSION,
            "schce_version": __version__,
            "model_class": type(self).__name__,
            "init_params": self.init_params_,
            "setup": self._setup.to_dict(),
            "registry": {k: v for k, v in self.registry_.items()},
            "is_trained": bool(self.is_trained_),
            "temperature": float(self.temperature_),
            "optimizer": self.optimizer_,
            "best_epoch": None if self.best_epoch_ is None else int(self.best_epoch_),
            "history": {
                k: {"epoch": df.index.tolist(), "value": df.iloc[:, 0].tolist()}
                for k, df in (self.history_ or {}).items()
            },
            "train_indices": None if self.train_indices_ is None else np.asarray(self.train_indices_).tolist(),
            "validation_indices": None
            if self.validation_indices_ is None
            else np.asarray(self.validation_indices_).tolist(),
            "test_indices": None if self.test_indices_ is None else np.asarray(self.test_indices_).tolist(),
        }
        state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        _model_file.write_model(dir_path, overwrite, meta, state, self.adata if save_anndata else None, prefix)
        logger.info("Saved the model to %s.", dir_path)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | MuData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
    ) -> HCEClassifier:
        """Load a model written by :meth:`save`; predict on any AnnData with :meth:`predict`.

        The signature is scvi-tools' :meth:`~scvi.model.base.BaseModelClass.load`.

        Parameters
        ----------
        dir_path
            Directory written by :meth:`save`.
        adata
            Labelled data to attach, as scvi-tools does: its genes must be the model's, in the model's order (Ensembl
            versions aside), and it is registered with the saved set-up arguments when it is not registered yet. It
            becomes ``model.adata``, the default of :meth:`predict` and :meth:`evaluate`. ``None``: no data attached
            (:meth:`predict` aligns any query's genes itself).
        accelerator, device
            Where to put the weights (``"auto"``: a GPU when there is one).
        prefix
            The ``prefix`` the model was saved with.
        """
        target = torch_device(accelerator, device)
        meta, state = _model_file.read_model(dir_path, cls.__name__, prefix)  # checksums and every field checked
        setup, registry = _model_file.setup_and_registry(meta)
        setup = SetupState.from_dict(setup)
        if adata is not None:
            _check_same_genes(adata, registry, setup.genes)
        params = meta["init_params"]
        backbone_kwargs = params["kwargs"].get("backbone_kwargs", {})
        model = cls(None, registry, **params["non_kwargs"], setup_state=setup, **backbone_kwargs)
        if "input_mean" in state:
            model.module.set_input_scaling(state["input_mean"], state["input_scale"])
        try:
            model.module.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"The weights in {dir_path} do not match the model described there: {err}") from err
        model.is_trained_ = meta["is_trained"]
        model.temperature_ = float(meta.get("temperature", 1.0))
        model.optimizer_, model.best_epoch_ = meta.get("optimizer"), meta.get("best_epoch")  # None in older files
        model.history_ = {
            k: pd.DataFrame({k: h["value"]}, index=pd.Index(h["epoch"], name="epoch"))
            for k, h in meta["history"].items()
        }
        model.train_indices_ = None if meta["train_indices"] is None else np.asarray(meta["train_indices"])
        model.validation_indices_ = (
            None if meta["validation_indices"] is None else np.asarray(meta["validation_indices"])
        )
        model.test_indices_ = None if meta.get("test_indices") is None else np.asarray(meta["test_indices"])
        model.module.to(target)
        model.module.eval()
        if adata is not None:
            model.adata = adata  # scvi-tools registers it with the saved set-up arguments when needed
        return model

    @classmethod
    def from_sctab_checkpoint(
        cls,
        ckpt_path: str | os.PathLike,
        var_path: str | os.PathLike,
        cell_type_path: str | os.PathLike,
        ontology=None,
        trusted: bool = False,
    ) -> HCEClassifier:
        """Load a published scTab or HCE-paper Lightning checkpoint as a trained classifier.

        Weights are read from the ``classifier.`` entries (the buffers ``class_weights``, ``child_lookup``,
        ``child_lookup_transposed`` and ``augmentations`` are not weights); the backbone (linear, MLP or TabNet)
        and its sizes from the weights' shapes; the loss is HCE when the checkpoint holds
        ``child_lookup_transposed``. The model keeps the checkpoint's own hierarchy (its ``child_lookup``) for loss
        and evaluation; where today's CL differs between its labels is logged and kept in
        ``model.hierarchy_differences_`` (see :func:`schce.data.compare_hierarchy`). Label names renamed in CL since
        2023 resolve through their former names. The model then predicts on any AnnData with the usual gene
        alignment.

        Parameters
        ----------
        ckpt_path
            The ``.ckpt`` file.
        var_path
            The store's ``var.parquet`` (``feature_id`` Ensembl IDs, ``feature_name`` symbols): the input genes.
        cell_type_path
            The store's ``categorical_lookup/cell_type.parquet``: the output labels (CL names, mapped to CL IDs).
        ontology
            Ontology for the name mapping and the hierarchy; default: the embedded CL release.
        trusted
            ``False`` (default): unpickle only tensors and the hyperparameter types scTab's checkpoints hold, and
            refuse anything else, since unpickling can run code. ``True``: unpickle everything (files you trust).
        """
        from schce import _sctab

        ckpt = _sctab.load_checkpoint(ckpt_path, trusted=trusted)
        backbone, arch, state, loss = _sctab.classifier_from_checkpoint(ckpt)
        genes = _sctab.read_genes(var_path)
        names = _sctab.read_labels(cell_type_path)
        onto = load_cell_ontology(ontology)
        labels = cl_label_ids(names, onto, f"labels of {cell_type_path}", "cannot keep their order.")
        hierarchy, differences = _sctab.checkpoint_hierarchy(ckpt, labels, onto)  # the published child_lookup
        setup = cls._state_without_data(genes, labels, onto, hierarchy, True)
        registry = cls._registry_without_data("from_sctab_checkpoint", True)
        # scTab's models read the log-normalised values as they are.
        model = cls(None, registry, backbone=backbone, loss=loss, standardize=False, setup_state=setup, **arch)
        model.hierarchy_differences_ = differences
        try:
            model.module.classifier.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"The weights in {ckpt_path} do not fit {len(genes)} genes × {len(labels)} labels: {err}"
            ) from err
        model.module.eval()
        model.is_trained_ = True
        logger.info("Loaded a %s %s classifier: %d genes, %d labels.", loss.upper(), backbone, len(genes), len(labels))
        return model

    @classmethod
    def from_sctab_store(
        cls,
        path: str | os.PathLike,
        backbone: Literal["mlp", "linear", "tabnet"] = "mlp",
        loss: Literal["hce-aware", "hce", "ce"] | None = None,
        hierarchy: Literal["store", "ontology"] = "store",
        normalize: bool | Literal["auto"] = "auto",
        ontology=None,
        recipe: Literal["sctab"] | None = None,
        **backbone_kwargs,
    ) -> HCEClassifier:
        """An untrained classifier for a scTab store (either layout); train it with ``model.train(datamodule=...)``.

        By default this is schce's own model (the package defaults of :class:`HCEClassifier`); ``recipe="sctab"``
        gives the published scTab / HCE-paper training instead: scTab's architecture, the published HCE (or
        ``loss="ce"``), and in :meth:`train` the store's ``class_weights.npy`` and ``augmentations.npy``, 50 epochs,
        StepLR 0.9, batch 2048 and model selection on the paper's macro F1 (see :doc:`/training`).

        Genes come from ``var.parquet`` (``feature_id``), labels from ``categorical_lookup/cell_type.parquet`` mapped
        to CL IDs (in code order, so the store's ``cell_type`` codes are the model's label codes), the hierarchy from
        ``cell_type_hierarchy/child_matrix.npy``, checked against the ontology: differences are logged and kept in
        ``model.hierarchy_differences_`` (see :func:`schce.data.compare_hierarchy`).

        Parameters
        ----------
        path
            Store directory.
        backbone, **backbone_kwargs
            As in :class:`HCEClassifier`.
        loss
            ``None`` (default): ``"hce-aware"`` for schce's store model, which reads what each label means per
            ``dataset_id`` from the store's code columns before training
            (:meth:`~schce.data.SCTabStoreDataModule.annotation_targets`); the published HCE
            (``loss="hce", hce_form="reference"``) under ``recipe="sctab"``; or ``"hce-aware"`` / ``"hce"`` / ``"ce"``.
        hierarchy
            ``"store"``: the relations of ``child_matrix.npy``; ``"ontology"``: the ontology's.
        normalize
            ``"auto"`` normalises in the model when the store holds integer counts (our synthetic stores) and not
            when it holds normalised values (scTab's published store).
        ontology
            Ontology for the label mapping and the check; default: the embedded CL release.
        recipe
            ``None``: schce's own model; ``"sctab"``: the published training. With the recipe, ``loss`` may be
            ``"hce"`` (the published ``log(q + 1e-6)`` form) or ``"ce"``.

        Examples
        --------
        >>> dm = schce.data.SCTabStoreDataModule("merlin_cxg_2023_05_15_sf-log1p", batch_size=2048, num_workers=8)
        >>> model = schce.HCEClassifier.from_sctab_store(dm.path, backbone="mlp")
        >>> model.train(datamodule=dm, max_epochs=20)
        >>> model.evaluate(datamodule=dm).overall
        >>> published = schce.HCEClassifier.from_sctab_store(dm.path, backbone="tabnet", recipe="sctab")
        >>> published.train(datamodule=dm)  # 50 epochs, the store's class weights and augmentations
        """
        from schce.model._store import store_setup

        setup = store_setup(path, ontology, hierarchy, normalize)
        state = cls._state_without_data(
            setup["genes"], setup["labels"], setup["ontology"], setup["hierarchy"], setup["normalize"]
        )
        state.sctab_store = os.fspath(path)
        registry = cls._registry_without_data("from_sctab_store", setup["normalize"])
        if loss is None and recipe is None:
            loss = STORE_LOSS
        # With a recipe, None is the recipe's loss and a loss it does not publish raises (HCEClassifier checks).
        model = cls(None, registry, backbone=backbone, loss=loss, recipe=recipe, setup_state=state, **backbone_kwargs)
        model.hierarchy_differences_ = setup["differences"]
        return model
