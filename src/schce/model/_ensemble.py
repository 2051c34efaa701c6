"""The seed ensemble: :class:`HCEEnsemble`, N :class:`HCEClassifier` members whose probabilities are averaged."""

from __future__ import annotations

import logging
import os
from numbers import Integral
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from mudata import MuData

from schce import _model_file
from schce.model._classifier import HCEClassifier
from schce.model._inference import InferenceMixin
from schce.model._state import SetupState

logger = logging.getLogger(__name__)

# Member i trains with seed + SEED_STRIDE * i (benchmarks/real_data.py's "+ensN" lever, whose figures these are).
SEED_STRIDE = 1000
_MEMBER_STATE = ("module", "hierarchy", "temperature_", "history_", "best_epoch_", "optimizer_", "_setup")


def _check_n_members(n_members) -> int:
    if isinstance(n_members, bool) or not isinstance(n_members, Integral) or n_members < 1:
        raise ValueError(
            f"n_members must be an integer of at least 1 (the number of seeds averaged; 5 measured best in "
            f"docs/method.md), got {n_members!r}."
        )
    return int(n_members)


class HCEEnsemble(InferenceMixin):
    """A seed ensemble of :class:`HCEClassifier` models: the mean of their calibrated probabilities.

    Member ``i`` is an :class:`HCEClassifier` on the same registered AnnData with the same arguments, trained by
    :meth:`train` with seed ``seed + 1000 * i``: its own validation split, early stopping and temperature
    calibration. :meth:`predict` and :meth:`evaluate` are :class:`HCEClassifier`'s, computed from the mean of the
    members' calibrated probabilities (``calibrated=False``: the mean of their softmax), so every output key and rule
    (coarse back-off, ``min_confidence``, majority voting, unassigned cells) is the same. The cost is N times the
    training time and N forward passes per prediction. On five real-data tasks five members changed the corrected
    macro F1 of the default by −0.004 to +0.019 and raised the accuracy (three seeds; see :doc:`/method`).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (the same as :meth:`HCEClassifier.setup_anndata`).
    n_members
        Number of members (seeds), at least 1; ``1`` is one :class:`HCEClassifier`.
    **model_kwargs
        :class:`HCEClassifier` arguments (``backbone``, ``loss``, ``n_hidden``, ...), the same for every member.

    Attributes
    ----------
    members
        The :class:`HCEClassifier` members, in seed order; each can be used, saved and loaded on its own.
    seeds_
        The seed each member was trained with (``None`` before :meth:`train`).

    An ensemble of classifiers trained elsewhere (e.g. on a store) is :meth:`from_members`.

    Examples
    --------
    >>> schce.HCEEnsemble.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    >>> ensemble = schce.HCEEnsemble(adata, n_members=5)
    >>> ensemble.train(max_epochs=50, seed=0)  # seeds 0, 1000, ..., 4000
    >>> ensemble.predict(query)
    >>> ensemble.save("ensemble/")
    """

    setup_anndata = HCEClassifier.setup_anndata
    setup_mudata = HCEClassifier.setup_mudata

    def __init__(self, adata: AnnData | MuData, n_members: int = 5, **model_kwargs):
        n_members = _check_n_members(n_members)
        if adata is None:
            raise ValueError(
                "HCEEnsemble needs the AnnData registered with HCEEnsemble.setup_anndata (to load a saved ensemble, "
                "use HCEEnsemble.load)."
            )
        for name in ("registry", "setup_state"):
            if name in model_kwargs:
                raise TypeError(f"HCEEnsemble does not take {name}=; its members are built on the registered adata.")
        self.members: list[HCEClassifier] = [HCEClassifier(adata, **model_kwargs) for _ in range(n_members)]
        self.seeds_: list[int] | None = None

    @classmethod
    def from_members(cls, models: list[HCEClassifier], seeds: list[int] | None = None) -> HCEEnsemble:
        """An ensemble of trained classifiers, e.g. models trained on a store (:meth:`HCEClassifier.from_sctab_store`).

        The models must share their genes, their labels in the same order with the same hierarchy, and their input
        handling; they are used as they are, not copied. ``seeds``: what they were trained with (recorded, saved and
        written to ``uns``).
        """
        models = list(models)
        if not models or not all(isinstance(m, HCEClassifier) for m in models):
            raise TypeError("from_members takes a non-empty list of HCEClassifier models.")
        if seeds is not None and (
            len(seeds) != len(models) or not all(isinstance(x, Integral) and not isinstance(x, bool) for x in seeds)
        ):
            raise ValueError(f"seeds must be None or {len(models)} integers, one per model, got {seeds!r}.")
        first = models[0]
        for i, m in enumerate(models[1:], start=1):
            what = [
                name
                for name, differs in (
                    ("genes", m.genes != first.genes),
                    ("labels", list(m.hierarchy.labels) != list(first.hierarchy.labels)),
                    ("label hierarchy", m.setup_state.hierarchy != first.setup_state.hierarchy),
                    ("input normalisation", m.setup_state.normalize != first.setup_state.normalize),
                )
                if differs
            ]
            if what:
                raise ValueError(
                    f"Model {i} differs from model 0 in its {' and '.join(what)}: an ensemble averages probabilities "
                    "over the same labels from the same input, so its members must share them."
                )
        ensemble = cls.__new__(cls)
        ensemble.members, ensemble.seeds_ = models, None if seeds is None else [int(x) for x in seeds]
        return ensemble

    @classmethod
    def from_sctab_store(cls, path: str | os.PathLike, n_members: int = 5, **model_kwargs) -> HCEEnsemble:
        """An untrained ensemble for a scTab store: ``n_members`` :meth:`HCEClassifier.from_sctab_store` models.

        Train it with ``ensemble.train(datamodule=SCTabStoreDataModule(path, ...), seed=0)``: member ``i`` trains
        on the store with seed ``seed + 1000 * i``, one after another. ``model_kwargs`` are
        :meth:`HCEClassifier.from_sctab_store`'s (``backbone``, ``loss``, ``recipe``, ...), the same for every member.
        """
        n_members = _check_n_members(n_members)
        return cls.from_members([HCEClassifier.from_sctab_store(path, **model_kwargs) for _ in range(n_members)])

    # ------------------------------------------------------------------ what the members share
    @property
    def n_members(self) -> int:
        """Number of members."""
        return len(self.members)

    @property
    def adata(self) -> AnnData | MuData | None:
        """The registered AnnData (shared by the members)."""
        return self.members[0].adata

    @property
    def registry_(self) -> dict:
        return self.members[0].registry_

    @property
    def setup_state(self) -> SetupState:
        """The members' :class:`~schce.model.SetupState` (labels, hierarchy, genes); a copy."""
        return self.members[0].setup_state

    @property
    def hierarchy(self):
        """The members' :class:`~schce.Hierarchy`."""
        return self.members[0].hierarchy

    @property
    def genes(self) -> list[str]:
        """The members' input genes."""
        return self.members[0].genes

    @property
    def backbone(self) -> str:
        return self.members[0].backbone

    @property
    def loss(self) -> str:
        return self.members[0].loss

    @property
    def label_semantics(self) -> str:
        return self.members[0].label_semantics

    @property
    def is_trained(self) -> bool:
        """Whether every member is trained."""
        return all(m.is_trained_ for m in self.members)

    is_trained_ = is_trained

    @property
    def history(self) -> list[dict[str, pd.DataFrame] | None]:
        """The members' training histories (:attr:`HCEClassifier.history`), in member order."""
        return [m.history_ for m in self.members]

    def _scorers(self) -> list[HCEClassifier]:
        return self.members

    def _ontology(self, ontology=None):
        return self.members[0]._ontology(ontology)

    def _require_trained(self) -> None:
        untrained = [i for i, m in enumerate(self.members) if not m.is_trained_]
        if untrained:
            raise RuntimeError(
                f"Member(s) {untrained} of the ensemble are not trained yet: call ensemble.train() first, or "
                "HCEEnsemble.load(...)."
            )

    def _prediction_uns(self, coarse_threshold, calibrated, aligner, normalize_used, min_confidence) -> dict:
        uns = super()._prediction_uns(coarse_threshold, calibrated, aligner, normalize_used, min_confidence)
        seeds = self.seeds_ if self.seeds_ is not None else []
        uns.update(model="HCEEnsemble", n_members=self.n_members, seeds=np.asarray(seeds, dtype=np.int64))
        uns["temperature"] = np.atleast_1d(uns["temperature"])  # one per member
        return uns

    # ------------------------------------------------------------------ training
    def train(self, seed: int = 0, **train_kwargs) -> None:
        """Train every member: member ``i`` with seed ``seed + 1000 * i``, the other arguments the same.

        Each member runs :meth:`HCEClassifier.train` in turn (its own validation split, early stopping and
        temperature), so the ensemble takes N times one model's time. ``checkpoint_dir`` gets one subdirectory per
        member (``member-<i>``), where ``ckpt_path="last"`` resumes each.

        Parameters
        ----------
        seed
            The first member's seed.
        **train_kwargs
            :meth:`HCEClassifier.train` arguments (``max_epochs``, ``batch_size``, ``validation_size``, ...).
        """
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}.")
        ckpt_path = train_kwargs.get("ckpt_path")
        if ckpt_path is not None and ckpt_path != "last":
            raise ValueError(
                "An ensemble resumes each member from its own checkpoint: pass ckpt_path='last' with the "
                f"checkpoint_dir of the interrupted run, not one file ({ckpt_path!r})."
            )
        checkpoint_dir = train_kwargs.pop("checkpoint_dir", None)
        names = _model_file.member_names(self.n_members)
        seeds = [int(seed) + SEED_STRIDE * i for i in range(self.n_members)]
        for i, (member, member_seed) in enumerate(zip(self.members, seeds, strict=True)):
            logger.info("Training member %d/%d (seed %d).", i + 1, self.n_members, member_seed)
            if checkpoint_dir is not None:
                train_kwargs["checkpoint_dir"] = Path(checkpoint_dir) / names[i]
            member.train(seed=member_seed, **train_kwargs)
        self.seeds_ = seeds

    def fine_tune(self, adata: AnnData | MuData, labels_key: str, seed: int = 0, **kwargs) -> list[str]:
        """Fine-tune every member on new labelled cells (:meth:`HCEClassifier.fine_tune`, the same arguments).

        Member ``i`` continues with seed ``seed + 1000 * i``. New labels are added to every member alike. When a
        member fails, the members fine-tuned before it are restored too: the ensemble is as it was.

        Returns
        -------
        The CL IDs of the labels added (empty when there were none).
        """
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}.")
        saved = [{name: getattr(m, name) for name in _MEMBER_STATE} for m in self.members]
        summaries = [m._model_summary_string for m in self.members]
        added = None
        try:
            for i, member in enumerate(self.members):
                logger.info("Fine-tuning member %d/%d (seed %d).", i + 1, self.n_members, seed + SEED_STRIDE * i)
                added = member.fine_tune(adata, labels_key, seed=int(seed) + SEED_STRIDE * i, **kwargs)
        except BaseException:
            for member, state, summary in zip(self.members, saved, summaries, strict=True):
                for name, value in state.items():
                    setattr(member, name, value)
                member._model_summary_string = summary
            raise
        return added

    # ------------------------------------------------------------------ embeddings
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
        member: int | None = None,
    ) -> np.ndarray:
        """The members' penultimate-layer embeddings side by side (cells × the sum of their widths), or one member's.

        ``member=None`` returns the concatenation in member order (what :meth:`predict` stores as
        ``obsm["X_{key}"]``); ``member=i`` returns member ``i``'s own embedding (cells × its ``n_latent``). The other
        arguments are :meth:`HCEClassifier.get_latent_representation`'s.
        """
        if member is not None:
            if isinstance(member, bool) or not isinstance(member, Integral) or not 0 <= member < self.n_members:
                raise ValueError(f"member must be None or a member index in [0, {self.n_members}), got {member!r}.")
            return self.members[member].get_latent_representation(adata, layer, gene_symbols, normalize, batch_size)
        self._require_trained()
        parts = [m.get_latent_representation(adata, layer, gene_symbols, normalize, batch_size) for m in self.members]
        return np.concatenate(parts, axis=1)

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | os.PathLike, overwrite: bool = False) -> None:
        """Save the ensemble to a directory, atomically.

        Writes ``member-<i>/`` with :meth:`HCEClassifier.save` for every member (each loads on its own with
        :meth:`HCEClassifier.load`) and the manifest ``schce-ensemble.json`` (format, version, member count, seeds,
        and the checksum of every member's files). A failure leaves ``dir_path`` as it was.

        Parameters
        ----------
        dir_path
            Target directory.
        overwrite
            Replace an existing directory, only when it holds nothing but an ensemble's files (the user's files are
            never deleted).
        """
        from schce import __version__

        saves = [lambda path, m=m: m.save(path) for m in self.members]
        info = {"schce_version": __version__, "model_class": type(self).__name__, "seeds": self.seeds_}
        _model_file.write_ensemble(dir_path, overwrite, saves, info)
        logger.info("Saved the ensemble of %d members to %s.", self.n_members, dir_path)

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | MuData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ) -> HCEEnsemble:
        """Load an ensemble written by :meth:`save`.

        The manifest, the member count and every member's checksums are checked, then each member is loaded with
        :meth:`HCEClassifier.load` (``adata``, ``accelerator`` and ``device`` as there), and the members must share
        their genes and labels.
        """
        manifest, dirs = _model_file.read_ensemble(dir_path, cls.__name__)
        members = [HCEClassifier.load(d, adata, accelerator, device) for d in dirs]
        try:
            return cls.from_members(members, manifest["seeds"])
        except ValueError as err:
            raise ValueError(f"The members in {dir_path} come from different models: {err}") from err

    # ------------------------------------------------------------------ display
    def view_anndata_setup(self, adata: AnnData | None = None, hide_state_registries: bool = False) -> None:
        """Print how the training AnnData was registered (the members share it)."""
        self.members[0].view_anndata_setup(adata, hide_state_registries)

    def __repr__(self) -> str:
        state = "trained" if self.is_trained else "not trained"
        seeds = f", seeds {self.seeds_}" if self.seeds_ is not None else ""
        return f"HCEEnsemble of {self.n_members} members ({state}{seeds}), each {self.members[0]._model_summary_string}"
