"""Inference: prediction, evaluation and embeddings."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from mudata import MuData

from schce._checks import check_groupby
from schce._keys import (
    check_key_added,
    check_output_keys,
    check_pulled_keys,
    check_query_columns,
    pull_outputs,
    pulled_columns,
    write_outputs,
)
from schce._output import SPARSE_SCORE_MIN, SPARSE_TOP, PredictionAccumulator, check_score_format, set_colors
from schce.data._expression import check_expression, empty_rows, get_matrix, resolve_normalize
from schce.data._genes import GeneAligner
from schce.data._loader import make_loader
from schce.evaluation import DEFAULT_GROUPBY, EvaluationResult, evaluate_predictions
from schce.model._setup import CUSTOM
from schce.ontology import load_cell_ontology
from schce.train._runner import iter_loader_outputs, loader_outputs, progress
from schce.vocabulary import map_labels
from schce.voting import cluster_column, voting_frame

MIN_GENE_OVERLAP = 0.1  # below 10% of its genes a model's calls are not evidence (a PBMC model on pancreas: ~1%)

logger = logging.getLogger(__name__)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Per-label probabilities of ``logits`` divided by ``temperature``, in float64."""
    return torch.softmax(torch.from_numpy(np.asarray(logits)).double() / temperature, dim=1).numpy()


def iter_mean_scores(models, loader, normalize: bool, calibrated: bool):
    """Yield, batch by batch, the mean of ``models``' probabilities (float64) and their embeddings side by side.

    Each model's probability is its softmax, of the logits divided by its fitted temperature when ``calibrated``.
    The embedding is one model's penultimate layer, or for several the members' concatenated in ``models`` order
    (cells × the sum of their widths). One pass over ``loader``: every batch is read once and run through each model.
    """
    temperatures = [m.temperature_ if calibrated else 1.0 for m in models]
    if len(models) == 1:  # the one model's own pass (with its progress bar)
        outputs = ([out] for out in iter_loader_outputs(models[0].module, loader, normalize))
    else:
        # one bar over the batches (each member's pass over one batch is too short for its own)
        batches = progress(loader, f"Predicting ({len(models)} members)")
        outputs = ([[*iter_loader_outputs(m.module, [batch], normalize)][0] for m in models] for batch in batches)
    for outs in outputs:
        probs = softmax(outs[0]["logits"].numpy(), temperatures[0])
        for out, t in zip(outs[1:], temperatures[1:], strict=True):
            probs += softmax(out["logits"].numpy(), t)
        embedding = torch.cat([out["embeddings"] for out in outs], dim=1).numpy() if len(outs) > 1 else None
        yield probs / len(models), outs[0]["embeddings"].numpy() if embedding is None else embedding


class InferenceMixin:
    """Predictions, evaluation and the latent representation of any AnnData, MuData or datamodule split."""

    # ------------------------------------------------------------------ inference
    def _scorers(self) -> list:
        """The trained classifiers whose mean probability is this model's: the model itself (an ensemble: its members).

        Every probability :meth:`predict` and :meth:`evaluate` use is the mean over these (:func:`iter_mean_scores`),
        so a single model and an ensemble share every rule that follows.
        """
        return [self]

    def _run(
        self, X, rows: np.ndarray, normalize: bool, aligner: GeneAligner | None, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits and embeddings of ``rows`` of ``X`` (module in eval mode, no gradients)."""
        out = loader_outputs(self.module, make_loader(X, rows, batch_size, aligner=aligner), normalize)
        return out["logits"], out["embeddings"]

    def _rna(self, data: AnnData | MuData) -> AnnData:
        """``data`` itself, or for a MuData its RNA modality (the one given to :meth:`setup_mudata`, else ``"rna"``)."""
        if not isinstance(data, MuData):
            return data
        mod = (self.registry_["setup_args"].get("modalities") or {}).get("rna_layer", "rna")
        if mod not in data.mod:
            raise KeyError(
                f"The MuData has no modality {mod!r} (it has {list(data.mod)}); pass the RNA modality itself, "
                "e.g. model.predict(mdata['gex'])."
            )
        return data.mod[mod]

    def _registered_layer(self) -> str | None:
        args = self.registry_["setup_args"]
        return args["rna_layer"] if "rna_layer" in args else args["layer"]

    def _registered_matrix(self):
        """The registered expression (the RNA modality's for a MuData)."""
        return get_matrix(self._rna(self.adata), self._registered_layer())

    def _prepare(
        self,
        adata: AnnData | MuData | None,
        layer: str | None,
        gene_symbols: str | None,
        normalize: bool | Literal["auto"],
    ) -> tuple[AnnData, object, GeneAligner, bool]:
        """The query's RNA AnnData, its matrix, the gene alignment and whether to normalise, after all input checks."""
        if adata is None:
            adata = self.adata
            if adata is None:
                raise ValueError("Pass the AnnData to predict on: this model has no registered AnnData.")
            if layer is None:
                layer = self._registered_layer()
        adata = self._rna(adata)
        if not isinstance(adata, AnnData):
            raise TypeError(f"Expected an AnnData or MuData, got {type(adata).__name__}.")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise ValueError(f"The query is empty ({adata.n_obs} cells × {adata.n_vars} genes).")
        if gene_symbols is not None:
            if gene_symbols not in adata.var.columns:
                raise KeyError(
                    f"gene_symbols={gene_symbols!r} is not a column of adata.var "
                    f"(available: {list(adata.var.columns)}). Pass None to match on var_names."
                )
            query_genes, where = adata.var[gene_symbols].astype(str).to_numpy(), f"var[{gene_symbols!r}]"
        else:
            query_genes, where = adata.var_names, "var_names"
        aligner = GeneAligner(self.genes, query_genes, where=where)
        X = get_matrix(adata, layer)
        where_x = f"adata.layers[{layer!r}]" if layer else "adata.X"
        summary = check_expression(X, adata.n_obs, where_x)
        normalize_used = resolve_normalize(normalize, summary, where_x, self.setup_state.to_dict())
        self._query_expression = summary.kind  # recorded in uns by predict
        return adata, X, aligner, normalize_used

    def _require_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError("The model is not trained yet: call model.train() first, or HCEClassifier.load(...).")

    def _forward(
        self,
        adata: AnnData | MuData | None,
        layer: str | None,
        gene_symbols: str | None,
        batch_size: int,
        normalize: bool | Literal["auto"],
    ) -> tuple[np.ndarray, np.ndarray, GeneAligner, bool, AnnData]:
        """Logits and embeddings of every cell, after all input checks."""
        self._require_trained()
        adata, X, aligner, normalize_used = self._prepare(adata, layer, gene_symbols, normalize)
        logits, embeddings = self._run(X, np.arange(adata.n_obs), normalize_used, aligner, batch_size)
        return logits, embeddings, aligner, normalize_used, adata

    def _score(
        self, X, acc: PredictionAccumulator, normalize: bool, aligner: GeneAligner, batch_size: int, calibrated: bool,
        keep_embedding: bool,
    ) -> np.ndarray | None:  # fmt: skip
        """Feed every cell's probabilities to ``acc`` batch by batch; the embedding (cells × latent) if asked for.

        Memory: the accumulator's outputs and the embedding, plus one batch; never all logits or probabilities.
        """
        loader = make_loader(X, np.arange(acc.n_cells), batch_size, aligner=aligner)
        embedding, start = None, 0
        for probs, h in iter_mean_scores(self._scorers(), loader, normalize, calibrated):
            acc.add(probs)
            if keep_embedding:
                if embedding is None:
                    embedding = np.zeros((acc.n_cells, h.shape[1]), dtype=np.float32)
                embedding[start : start + len(h)] = h
            start += len(h)
        return embedding

    def predict(
        self,
        adata: AnnData | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        key_added: str = "schce",
        coarse_threshold: float = 0.5,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
        inplace: bool = True,
        calibrated: bool = True,
        overwrite: bool = False,
        majority_voting: bool = False,
        over_clustering: str | None = None,
        min_confidence: float = 0.0,
        min_gene_overlap: float = MIN_GENE_OVERLAP,
        truth_key: str | None = None,
        hierarchical_scores: Literal["dense", "sparse", "none"] = "dense",
    ) -> pd.DataFrame:
        """Predict cell types and write them into ``adata``.

        Writes, with prefix ``key_added``:

        - ``obs["{key}_prediction"]`` (CL name of the argmax label), ``obs["{key}_prediction_ontology_term_id"]``,
          ``obs["{key}_confidence"]`` (its probability);
        - ``obs["{key}_prediction_coarse"]`` (+ ``_ontology_term_id``): the deepest term (label or ancestor) whose
          subtree probability is at least ``coarse_threshold`` — a back-off when the model is unsure;
        - ``obsm["{key}_probabilities"]`` (cells × labels), ``obsm["{key}_hierarchical_scores"]`` (cells ×
          labels and their ancestors: the summed probability of each term's subtree; see ``hierarchical_scores``),
          ``obsm["X_{key}"]`` (the penultimate-layer embedding);
        - ``obs["{key}_unassigned_reason"]``: why a cell is ``"unassigned"`` (no expression in the model's genes:
          confidence 0; gene overlap below ``min_gene_overlap``; confidence below ``min_confidence``), else missing;
        - with ``majority_voting=True``: ``obs["{key}_majority_voting"]`` (+ ``_ontology_term_id``, ``_fraction``,
          and ``obs["{key}_over_clustering"]`` when no ``over_clustering`` is given), see
          :func:`schce.majority_vote`;
        - ``uns["{column}_colors"]`` for every categorical column above (and ``truth_key``): one colour per cell
          type, shared by all of them;
        - ``uns["{key}"]``: model, ontology version, threshold, gene overlap, and the keys written.

        Categories are the values present only, in the hierarchy's depth-first order (``"unassigned"`` last), so
        ``sc.pl.dotplot``, ``sc.tl.rank_genes_groups`` and ``sc.pl.umap`` take any of these columns as they are.

        Nothing else in ``adata`` changes: an entry of the same name that schce did not write is an error (before
        any work) unless ``overwrite=True``; schce's own entries from an earlier run are replaced.

        Memory: cells are scored batch by batch (a backed file is read a batch at a time); what grows with the number
        of cells is only what is stored: the obs columns, the probabilities (cells × labels), the embedding and the
        hierarchical scores in the form asked for (with ``inplace=False``: the obs columns alone).

        Parameters
        ----------
        adata
            Query cells; default: the registered AnnData. Dense, sparse or backed.
        layer
            Layer with the expression; default ``adata.X`` (the registered layer for the registered AnnData).
        gene_symbols
            ``var`` column holding identifiers of the model's type, when ``var_names`` do not.
        key_added
            Prefix of the output keys.
        coarse_threshold
            Subtree probability needed for the coarse prediction.
        normalize
            ``"auto"`` normalises counts and count-like values and leaves log-normalised data as it is; a model
            trained on counts with ``normalize=False`` gets its queries as given, as it was trained.
        batch_size
            Cells per forward pass.
        inplace
            Write into ``adata``; ``False`` only returns the table.
        calibrated
            Divide the logits by the temperature fitted after training (probabilities, confidence and the coarse
            call change; the argmax label does not).
        overwrite
            Replace entries of the output names that schce did not write (refused by default).
        majority_voting
            Also smooth the calls over clusters (subtree-aware; see :func:`schce.majority_vote`).
        over_clustering
            ``obs`` column of clusters to vote in; default: a fine Leiden over-clustering of the embedding.
        min_confidence
            Cells whose (calibrated) confidence is below this are called ``"unassigned"``; ``0`` (default) keeps
            every call.
        min_gene_overlap
            Fraction of the model's genes the query must have; below it every cell is ``"unassigned"`` (a model
            cannot speak for cells it barely sees). ``0`` keeps every call.
        truth_key
            ``obs`` column of known labels (CL IDs or names, or the free-text labels of the training mapping) to
            colour like the predictions: ``uns["{truth_key}_colors"]``.
        hierarchical_scores
            Form of ``obsm["{key}_hierarchical_scores"]``: ``"dense"`` a float32 DataFrame, cells × terms;
            ``"sparse"`` a float32 CSR matrix of each cell's 32 highest scores of at least 0.001 (at most 256 bytes a
            cell; columns: ``uns["{key}"]["terms"]``), for large queries; ``"none"``: not stored. The calls are the
            same for all three.

        Returns
        -------
        The obs columns above as a DataFrame indexed by ``obs_names``.
        """
        if not 0 < coarse_threshold <= 1:
            raise ValueError(f"coarse_threshold must be in (0, 1], got {coarse_threshold}.")
        for name, value in (("min_confidence", min_confidence), ("min_gene_overlap", min_gene_overlap)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        check_key_added(key_added)
        check_score_format(hierarchical_scores)
        mdata = adata if adata is not None else self.adata
        target = self._rna(mdata) if mdata is not None else None
        if isinstance(target, AnnData):  # before any work
            check_query_columns(target, truth_key, over_clustering if majority_voting else None)
            if inplace:
                planned = {"majority_voting": majority_voting, "over_clustering": over_clustering}
                check_output_keys(target, key_added, overwrite, hierarchical_scores=hierarchical_scores, **planned)
                if isinstance(mdata, MuData):  # and the copies pulled into mdata.obs
                    check_pulled_keys(mdata, target, key_added, overwrite, **planned)
        layer_used = self._registered_layer() if adata is None and layer is None else layer
        mdata = mdata if isinstance(mdata, MuData) else None
        self._require_trained()
        adata, X, aligner, normalize_used = self._prepare(adata, layer, gene_symbols, normalize)
        acc = PredictionAccumulator(
            self.hierarchy, adata.n_obs, coarse_threshold, inplace, hierarchical_scores if inplace else "none"
        )
        keep_embedding = inplace or (majority_voting and over_clustering is None)
        emb = self._score(X, acc, normalize_used, aligner, batch_size, calibrated, keep_embedding)
        empty = empty_rows(get_matrix(adata, layer_used), adata.n_obs, aligner.query_columns())
        low_overlap = None
        if aligner.overlap < min_gene_overlap:
            low_overlap = (
                f"gene overlap {100 * aligner.overlap:.1f}% of the model's genes, below min_gene_overlap="
                f"{min_gene_overlap:g}"
            )
        obs, obsm = acc.frame(adata.obs_names, key_added, empty, min_confidence, low_overlap)
        if majority_voting:
            clusters = None if over_clustering is None else cluster_column(adata.obs, over_clustering)
            votes = voting_frame(
                obs[f"{key_added}_prediction_ontology_term_id"].to_numpy(), adata.obs_names, self.hierarchy,
                key_added, clusters, emb,
            )  # fmt: skip
            obs = pd.concat([obs, votes], axis=1)
        if inplace:
            uns = self._prediction_uns(coarse_threshold, calibrated, aligner, normalize_used, min_confidence)
            uns["hierarchical_scores"] = hierarchical_scores
            if hierarchical_scores == "sparse":
                uns.update(terms=np.asarray(self.hierarchy.terms, dtype=object), sparse_top=SPARSE_TOP)
                uns["sparse_score_min"] = SPARSE_SCORE_MIN
            obsm[f"X_{key_added}"] = emb
            pulled_before = pulled_columns(mdata, adata, key_added) if mdata is not None else set()
            write_outputs(adata, obs, obsm, uns, key_added, overwrite)
            coloured = [c for c in obs.columns if isinstance(obs[c].dtype, pd.CategoricalDtype)]
            coloured = [c for c in coloured if not c.endswith(("_unassigned_reason", "_over_clustering"))]
            set_colors(
                adata, [*coloured, *([truth_key] if truth_key else [])], self.hierarchy, self.setup_state.label_map
            )
            if mdata is not None:  # our columns only, as mdata.obs["rna:schce_prediction"], ...
                pull_outputs(mdata, adata, key_added, list(obs.columns), pulled_before)
        return obs

    def _prediction_uns(self, coarse_threshold, calibrated, aligner, normalize_used, min_confidence) -> dict:
        from schce import __version__

        temperatures = [float(m.temperature_ if calibrated else 1.0) for m in self._scorers()]  # an ensemble: each
        return {
            "schce_version": __version__,
            "backbone": self.backbone,
            "loss": self.loss,
            "label_semantics": self.label_semantics,
            "n_labels": self.hierarchy.n_labels,
            "ontology_version": self.hierarchy.version,
            "coarse_threshold": float(coarse_threshold),
            "min_confidence": float(min_confidence),
            "temperature": temperatures[0] if len(temperatures) == 1 else np.asarray(temperatures),
            "gene_overlap": aligner.summary(),
            "normalized": bool(normalize_used),
            "expression": self._query_expression,
        }

    def _probabilities(self, logits: np.ndarray, calibrated: bool) -> np.ndarray:
        return softmax(logits, self.temperature_ if calibrated else 1.0)

    def _all_probabilities(
        self, adata, layer, gene_symbols, batch_size: int, normalize, calibrated: bool
    ) -> tuple[np.ndarray, AnnData]:
        """Every cell's probabilities (the mean over :meth:`_scorers`) and the query's RNA AnnData, after all checks."""
        self._require_trained()
        adata, X, aligner, normalize_used = self._prepare(adata, layer, gene_symbols, normalize)
        loader = make_loader(X, np.arange(adata.n_obs), batch_size, aligner=aligner)
        batches = [probs for probs, _ in iter_mean_scores(self._scorers(), loader, normalize_used, calibrated)]
        return np.concatenate(batches) if batches else np.empty((0, self.hierarchy.n_labels)), adata

    def evaluate(
        self,
        adata: AnnData | None = None,
        labels_key: str | None = None,
        groupby: Sequence[str] = DEFAULT_GROUPBY,
        output_dir: str | os.PathLike | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        coarse_threshold: float = 0.5,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
        calibrated: bool = True,
        ontology=None,
        datamodule: pl.LightningDataModule | None = None,
        split: Literal["test", "val", "train"] = "test",
        convention: Literal["schce", "paper", "paper_ood"] = "schce",
    ) -> EvaluationResult:
        """Score the model on labelled cells: exact and hierarchy-corrected metrics, per class and per group.

        True labels may be CL IDs or names. A true label that is a model label or an ancestor of model labels is
        scored with the scTab rule (a prediction is correct when it is the truth or one of its descendants). A
        label finer than the model's (a descendant of model labels, but not itself a label) is scored against its
        nearest model ancestor. A label with no model ancestor below the root cannot be scored; it is counted in
        ``n_not_scorable``. No cell is dropped silently: every count is in ``result.overall``.

        Parameters
        ----------
        adata
            Labelled cells; ``adata`` is not modified.
        labels_key
            ``obs`` column with the true labels.
        groupby
            ``obs`` columns to break the metrics down by. A column you name must exist (else ``KeyError``); of the
            default columns, those absent are skipped.
        output_dir
            When given, write the tables there (see :meth:`EvaluationResult.write`).
        layer, gene_symbols, normalize, batch_size, calibrated
            As in :meth:`predict`.
        coarse_threshold
            Subtree probability for the coarse back-off calls whose accuracy is reported.
        ontology
            Ontology to place true labels outside the model's terms; default: the one given to
            :meth:`setup_anndata` when it was a path or URL, else the embedded CL release.
        datamodule, split
            Instead of ``adata``: stream a datamodule's ``split`` loader (e.g. the test split of an
            :class:`~schce.data.SCTabStoreDataModule`); true labels are its ``y`` codes, and the groups come from
            its ``read_obs(split)`` when it has one. Memory: the probabilities, cells × labels.
        convention
            ``"schce"``: the evaluation described above. ``"paper"`` / ``"paper_ood"``: the numbers as the HCE
            paper's evaluation code computes them (cells outside the model's labels dropped, macro F1 of the
            corrected predictions over true ∪ predicted labels, resp. over the true labels); see
            :func:`schce.evaluation.paper_evaluation`.

        Returns
        -------
        :class:`~schce.evaluation.EvaluationResult` with ``overall``, ``per_class``, ``per_group`` and ``detailed``.
        """
        if datamodule is not None:
            from schce.model._store import datamodule_probabilities

            if groupby is not DEFAULT_GROUPBY:  # a named column the split's metadata lacks fails here, named
                check_groupby(datamodule.read_obs(split).columns, groupby, DEFAULT_GROUPBY, f"the {split} split's obs")
            onto = load_cell_ontology(ontology)
            true_terms, probs, obs = datamodule_probabilities(self._scorers(), datamodule, split, calibrated)
            result = evaluate_predictions(
                true_terms, probs, self.hierarchy, onto.ancestors, obs, groupby, coarse_threshold, obs.index, convention
            )
            if output_dir is not None:
                result.write(output_dir)
            return result
        if adata is None or labels_key is None:
            raise TypeError("Pass the labelled AnnData and its labels_key, or datamodule= to score a store's split.")
        raw = self._labels(adata, labels_key)
        check_groupby(self._rna(adata).obs.columns, groupby, DEFAULT_GROUPBY)  # a typo fails here, named
        true_terms, ancestors = self._true_terms(raw, ontology)
        probs, adata = self._all_probabilities(adata, layer, gene_symbols, batch_size, normalize, calibrated)
        result = evaluate_predictions(
            true_terms,
            probs,
            self.hierarchy,
            ancestors,
            obs=adata.obs,
            groupby=groupby,
            coarse_threshold=coarse_threshold,
            obs_names=adata.obs_names,
            convention=convention,
        )
        if output_dir is not None:
            result.write(output_dir)
        return result

    def _true_terms(self, raw: pd.Series, ontology) -> tuple[np.ndarray, object]:
        """True labels as terms (through the training label mapping first) and the ``ancestors`` rule to score them."""
        state = self.setup_state
        values = raw.astype(str)
        if state.ontology_source == CUSTOM:  # the user's own labels: terms of the model's hierarchy, as they are
            hier = self.hierarchy
            unknown = sorted(set(values) - set(hier.terms))
            if unknown:
                logger.warning(
                    "%d true label(s) are not terms of the model's hierarchy and cannot be scored: %s.",
                    len(unknown),
                    ", ".join(unknown[:10]),
                )
            return values.to_numpy(), lambda t: hier.ancestors(t) if t in hier.terms else set()
        onto = self._ontology(ontology)
        seen = set(values)
        mapping = map_labels(values.unique(), onto, {k: v for k, v in state.label_map.items() if k in seen})
        return values.map(mapping).to_numpy(), onto.ancestors

    def _labels(self, data: AnnData | MuData, labels_key: str) -> pd.Series:
        """``obs[labels_key]`` of the RNA cells (for a MuData: the RNA modality's column, else ``mdata.obs``'s)."""
        rna = self._rna(data)
        if not isinstance(rna, AnnData):
            raise TypeError(f"Expected an AnnData or MuData, got {type(data).__name__}.")
        obs = rna.obs
        if labels_key not in obs.columns and isinstance(data, MuData) and labels_key in data.obs.columns:
            obs = data.obs.reindex(rna.obs_names)
        if labels_key not in obs.columns:
            raise KeyError(
                f"labels_key={labels_key!r} is not a column of adata.obs. Available columns: {list(obs.columns)}."
            )
        raw = obs[labels_key]
        if raw.isna().any():
            raise ValueError(f"{int(raw.isna().sum())} cell(s) have no label in obs[{labels_key!r}]; drop them first.")
        return raw

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        layer: str | None = None,
        gene_symbols: str | None = None,
        normalize: bool | Literal["auto"] = "auto",
        batch_size: int = 1024,
    ) -> np.ndarray:
        """Penultimate-layer embedding, cells × ``n_latent`` (the logits for the linear backbone)."""
        return self._forward(adata, layer, gene_symbols, batch_size, normalize)[1]
