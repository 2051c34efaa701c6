"""Fine-tuning a trained model on new labelled cells: :meth:`~schce.HCEClassifier.fine_tune`."""

from __future__ import annotations

import copy
import logging
from typing import Literal

import lightning.pytorch as pl
import numpy as np
from anndata import AnnData
from mudata import MuData

from schce.data._anndata import AnnDataModule
from schce.data._loader import split_cells
from schce.hierarchy import Hierarchy
from schce.nn import extend_head, output_layer
from schce.train import FrozenModules
from schce.train._config import TrainConfig
from schce.vocabulary import map_labels

logger = logging.getLogger(__name__)


class FineTuneMixin:
    """Continued training from the current weights."""

    def fine_tune(
        self,
        adata: AnnData | MuData,
        labels_key: str,
        max_epochs: int = 50,
        freeze_encoder: bool = False,
        new_labels: Literal["add", "error"] = "add",
        layer: str | None = None,
        gene_symbols: str | None = None,
        normalize: bool | Literal["auto"] = "auto",
        ontology=None,
        validation_size: float = 0.1,
        batch_size: int | None = None,
        lr: float | None = None,
        weight_decay: float | None = None,
        lr_gamma: float = 0.98,
        early_stopping: bool = True,
        early_stopping_patience: int = 10,
        class_weights: Literal["balanced"] | None = "balanced",
        accelerator: str = "auto",
        devices: int | str = 1,
        seed: int = 0,
        num_workers: int = 0,
        enable_progress_bar: bool = True,
        calibrate: bool = True,
        **trainer_kwargs,
    ) -> list[str]:
        """Continue training from the current weights on new labelled cells.

        Works on any trained model: one trained here, one from :meth:`load`, or a published checkpoint from
        :meth:`from_sctab_checkpoint`. The cells' genes are aligned to the model's (missing genes zero-filled, as in
        :meth:`predict`). Labels the model does not have are added as new outputs after the existing ones, and the
        hierarchy gains them (with their ontology ancestors); the existing labels keep their output indices and,
        until training moves them, their weights. Training then runs as in :meth:`train` (stratified validation
        split, early stopping on the validation hierarchy-corrected macro F1, best epoch kept, temperature
        re-fitted). Everything is checked first: on bad input the model is unchanged.

        The cells here are all the model sees while fine-tuning, so labels absent from them can be forgotten; add
        some of the original training cells to keep them.

        Parameters
        ----------
        adata
            Labelled cells (AnnData, or MuData whose RNA modality is used); not modified.
        labels_key
            ``obs`` column with the labels (CL IDs or names).
        max_epochs
            Maximum number of passes over the cells.
        freeze_encoder
            Train only the output layer (the rest of the network, BatchNorm statistics included, stays as it is).
            Not available for the linear backbone, which has no encoder.
        new_labels
            ``"add"``: labels the model lacks become new outputs; ``"error"``: raise, naming them.
        layer, gene_symbols, normalize
            As in :meth:`predict`.
        ontology
            Ontology to map labels and place new ones; default: the one the model was set up with when it was a path
            or URL, else the embedded CL release.
        validation_size, batch_size, lr, weight_decay, lr_gamma, early_stopping, early_stopping_patience
            As in :meth:`train`.
        class_weights, accelerator, devices, seed, num_workers, enable_progress_bar, calibrate, **trainer_kwargs
            As in :meth:`train`.

        Returns
        -------
        The CL IDs of the labels added (empty when there were none).
        """
        if not self.is_trained_:
            raise RuntimeError("fine_tune continues training a trained model: call train() first, or load a model.")
        if new_labels not in ("add", "error"):
            raise ValueError(f"new_labels must be 'add' or 'error', got {new_labels!r}.")
        # Fine-tuning continues with AdamW at the package defaults, whatever recipe trained the model.
        # The validation macro F1 as before: the weighted-loss default of train() was measured on training only.
        config = TrainConfig.from_arguments(locals(), optimizer="adamw", early_stopping_monitor="f1")
        config = config.resolve(self.backbone, None, None)
        if freeze_encoder and output_layer(self.module.classifier) is self.module.classifier:
            raise ValueError(f"The {self.backbone} backbone has no encoder to freeze; use freeze_encoder=False.")
        terms, added, hierarchy = self._fine_tune_labels(adata, labels_key, ontology, new_labels)
        data, X, aligner, normalize_used = self._prepare(adata, layer, gene_symbols, normalize)
        codes = hierarchy.label_index(terms)
        train_idx, val_idx, _ = split_cells(codes, validation_size, 0.0, seed)
        datamodule = AnnDataModule(
            X,
            codes,
            hierarchy.labels,
            train_idx,
            val_idx,
            batch_size=config.batch_size_for(len(train_idx), None, self.backbone),
            seed=seed,
            num_workers=num_workers,
            aligner=aligner,
            obs=data.obs,
        )

        pl.seed_everything(seed, workers=True, verbose=False)
        # Train a copy, so an interrupted or failed run leaves the model as it was.
        saved = (self.module, self.hierarchy, self.temperature_, self.history_, self.best_epoch_, self.optimizer_)
        self.module = copy.deepcopy(self.module).train()
        self.hierarchy = hierarchy
        extend_head(self.module.classifier, len(added))
        head = output_layer(self.module.classifier)
        frozen = [m for m in self.module.classifier.children() if m is not head] if freeze_encoder else []
        for m in frozen:
            m.requires_grad_(False)
        if added:
            logger.info("Added %d label(s) to the model: %s.", len(added), ", ".join(hierarchy.names(added)))
        try:
            self._run_fit(datamodule, config, normalize_used, callbacks=[FrozenModules(frozen)] if frozen else [])
        except BaseException:
            self.module, self.hierarchy, self.temperature_, self.history_, self.best_epoch_, self.optimizer_ = saved
            raise
        finally:
            for m in frozen:
                m.requires_grad_(True)
        self._record_fine_tuning(hierarchy, len(saved[1].labels), int(data.n_obs), added, freeze_encoder)
        return added

    def _record_fine_tuning(self, hierarchy: Hierarchy, n_old: int, n_cells: int, added, freeze_encoder) -> None:
        """The grown hierarchy and a record of the run in the model's set-up, and the label count in its summary."""
        setup = self.setup_state
        setup.hierarchy = hierarchy.to_dict()
        setup.fine_tuning.append({"n_cells": n_cells, "labels_added": added, "freeze_encoder": bool(freeze_encoder)})
        self._setup = setup
        self._model_summary_string = self._model_summary_string.replace(
            f"{n_old} labels", f"{hierarchy.n_labels} labels", 1
        )

    def _fine_tune_labels(
        self, adata, labels_key: str, ontology, new_labels: str
    ) -> tuple[np.ndarray, list, Hierarchy]:
        """The cells' CL IDs, the labels the model lacks (refused with ``new_labels="error"``), the grown hierarchy."""
        raw = self._labels(adata, labels_key)
        onto = self._ontology(ontology)
        seen = set(raw.astype(str))
        known = {k: v for k, v in self.setup_state.label_map.items() if k in seen}  # the training label mapping
        terms = raw.astype(str).map(map_labels(raw.astype(str).unique(), onto, known)).to_numpy()
        added = sorted(set(terms) - set(self.hierarchy.labels))
        if added and new_labels == "error":
            raise ValueError(
                f"{len(added)} label(s) of obs[{labels_key!r}] are not outputs of the model: "
                f"{[f'{t} ({onto.name(t)})' for t in added]}. Pass new_labels='add' to add them, or drop those cells."
            )
        hierarchy = Hierarchy.from_ontology([*self.hierarchy.labels, *added], onto) if added else self.hierarchy
        return terms, added, hierarchy
