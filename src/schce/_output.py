"""Building and writing the prediction output contract (see DESIGN.md)."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from schce.hierarchy import Hierarchy

logger = logging.getLogger(__name__)

UNASSIGNED = "unassigned"
UNASSIGNED_COLOR = "#d3d3d3"
_GREYS = ["#7f7f7f", "#a9a9a9", "#555555", "#bdbdbd"]  # categories outside the hierarchy
NO_EXPRESSION = "no expression in the model's genes"
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_key_added(key_added) -> None:
    """Refuse a ``key_added`` that would give keys such as ``_prediction`` or ``X_``, or break h5ad paths."""
    if not isinstance(key_added, str) or not _KEY.fullmatch(key_added):
        raise ValueError(
            f"key_added must be a non-empty name of letters, digits, '_', '.' or '-' (starting with a letter or "
            f"digit), got {key_added!r}. The default is 'schce'."
        )


def output_keys(
    key_added: str,
    majority_voting: bool = False,
    over_clustering: str | None = None,
    hierarchical_scores: str = "dense",
) -> dict[str, list[str]]:
    """Every key :meth:`~schce.HCEClassifier.predict` writes, by place."""
    obs = ["prediction", "prediction_ontology_term_id", "confidence", "prediction_coarse"]
    obs += ["prediction_coarse_ontology_term_id", "unassigned_reason"]
    obs = [f"{key_added}_{c}" for c in obs] + (voting_keys(key_added, over_clustering) if majority_voting else [])
    obsm = [f"{key_added}_probabilities", f"{key_added}_hierarchical_scores", f"X_{key_added}"]
    if hierarchical_scores == "none":
        obsm.remove(f"{key_added}_hierarchical_scores")
    return {"obs": obs, "obsm": obsm}


def voting_keys(key_added: str, over_clustering: str | None = None) -> list[str]:
    """The ``obs`` columns of a majority vote (:func:`schce.majority_vote`, ``predict(majority_voting=True)``)."""
    obs = ["majority_voting", "majority_voting_ontology_term_id", "majority_voting_fraction"]
    return [f"{key_added}_{c}" for c in obs + (["over_clustering"] if over_clustering is None else [])]


def written_before(adata: AnnData, key_added: str) -> set[tuple[str, str]]:
    """The ``(place, key)`` entries an earlier ``predict`` recorded in ``uns[key_added]``; empty when none."""
    prev = adata.uns.get(key_added)
    if not isinstance(prev, Mapping) or "schce_version" not in prev:
        return set()
    written = prev.get("written")
    if not isinstance(written, Mapping):  # written by a schce that did not record its keys: its fixed names
        written = output_keys(key_added)
    ours = {(place, str(k)) for place in ("obs", "obsm") for k in np.asarray(written.get(place, []), dtype=str)}
    return ours | {("uns", key_added)}


def check_query_columns(adata: AnnData, truth_key: str | None, over_clustering: str | None) -> None:
    """The ``obs`` columns ``predict`` reads besides the expression must exist (checked before any work)."""
    for key, what in ((truth_key, "truth_key"), (over_clustering, "over_clustering")):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(
                f"{what}={key!r} is not a column of adata.obs. Available columns: {list(adata.obs.columns)}."
            )


def check_output_keys(adata: AnnData, key_added: str, overwrite: bool = False, **planned_options) -> list[str]:
    """Refuse to overwrite entries that ``predict`` did not write; return those it will replace (its own).

    Run before any work. ``overwrite=True`` replaces foreign entries of the same names too. ``planned_options``
    go to :func:`output_keys` (majority voting adds its columns).
    """
    check_key_added(key_added)
    return check_foreign_keys(adata, key_added, output_keys(key_added, **planned_options), overwrite)


def check_foreign_keys(
    adata: AnnData,
    key_added: str,
    planned: Mapping[str, list[str]],
    overwrite: bool,
    ours: set[tuple[str, str]] | None = None,
    name: str = "adata",
) -> list[str]:
    """The one rule for every schce writer: refuse entries of the ``planned`` names that schce did not write.

    ``planned`` lists the ``obs`` columns and ``obsm`` keys to be written (``uns[key_added]`` always is, unless
    ``ours`` is given). Entries an earlier schce call recorded in ``uns[key_added]["written"]`` (or listed in
    ``ours``) are schce's own and returned (to be replaced, with a log line); any other is an error naming it and the
    ways out, unless ``overwrite=True`` (then a warning). ``name`` names ``adata`` in the message.
    """
    present = [("obs", c) for c in planned.get("obs", []) if c in adata.obs.columns]
    present += [("obsm", k) for k in planned.get("obsm", []) if k in adata.obsm]
    if ours is None:
        present += [("uns", key_added)] if key_added in adata.uns else []
        ours = written_before(adata, key_added)
    foreign = [f"{place}[{key!r}]" for place, key in present if (place, key) not in ours]
    if foreign and not overwrite:
        raise ValueError(
            f"{name} already holds {', '.join(foreign)}, which schce did not write. Pass key_added= another prefix "
            "(e.g. key_added='schce2'), rename that entry, or pass overwrite=True to replace it."
        )
    if foreign:
        logger.warning("Overwriting entries schce did not write (overwrite=True): %s.", ", ".join(foreign))
    return [f"{place}[{key!r}]" for place, key in present]


def pulled_columns(mdata, rna: AnnData, key_added: str) -> set[tuple[str, str]]:
    """The ``mdata.obs`` copies of schce's columns of the RNA modality ``rna`` (``"rna:schce_prediction"``)."""
    mod = next(name for name, m in mdata.mod.items() if m is rna)
    return {("obs", f"{mod}:{k}") for place, k in written_before(rna, key_added) if place == "obs"}


def check_pulled_keys(mdata, rna: AnnData, key_added: str, overwrite: bool = False, **planned_options) -> None:
    """For a MuData, the ``mdata.obs`` copies ``predict`` pulls of its columns follow the same rule.

    A copy is schce's when the modality's record lists its column. Run before any work.
    """
    mod = next(name for name, m in mdata.mod.items() if m is rna)
    ours = pulled_columns(mdata, rna, key_added)
    planned = {"obs": [f"{mod}:{c}" for c in output_keys(key_added, **planned_options)["obs"]]}
    check_foreign_keys(mdata, key_added, planned, overwrite, ours=ours, name="mdata")


def pull_outputs(mdata, rna: AnnData, key_added: str, columns: list[str], before: set[tuple[str, str]]) -> None:
    """Copy ``columns`` of the RNA modality into ``mdata.obs`` (``"rna:<column>"``); drop stale copies of schce's.

    ``before``: the copies that were schce's before this run (:func:`pulled_columns`, read before writing).
    """
    mod = next(name for name, m in mdata.mod.items() if m is rna)
    stale = [k for place, k in sorted(before) if k not in {f"{mod}:{c}" for c in columns} and k in mdata.obs]
    if stale:
        mdata.obs.drop(columns=stale, inplace=True)
    with warnings.catch_warnings():  # pandas' copy warning raised inside mudata 0.3's pull_obs
        warnings.simplefilter("ignore", pd.errors.SettingWithCopyWarning)
        mdata.pull_obs(columns=columns, mods=[mod])


def record_written(adata: AnnData, key_added: str, obs_columns: list[str], dropped: list[str] = ()) -> None:
    """Add ``obs_columns`` to the keys ``uns[key_added]["written"]`` records as schce's (``dropped`` leave it).

    Creates a minimal record (schce's version and the keys) when ``uns[key_added]`` is not schce's, so a later call
    recognises these columns as its own. Run after :func:`check_foreign_keys`.
    """
    from schce import __version__

    before = sorted(written_before(adata, key_added))
    record = dict(adata.uns[key_added]) if before else {"schce_version": __version__}
    obs = [key for place, key in before if place == "obs" and key not in dropped]
    obsm = [key for place, key in before if place == "obsm"]
    record["written"] = {"obs": obs + [c for c in obs_columns if c not in obs], "obsm": obsm}
    adata.uns[key_added] = record


SCORE_FORMATS = ("dense", "sparse", "none")
SPARSE_TOP = 32  # the sparse hierarchical scores keep each cell's 32 highest subtree scores ...
SPARSE_SCORE_MIN = 1e-3  # ... of at least this
CHUNK_CELLS = 4096  # cells scored at a time when a whole probability matrix is given


def check_score_format(hierarchical_scores) -> None:
    """Refuse a ``hierarchical_scores`` choice other than ``"dense"``, ``"sparse"`` or ``"none"``."""
    if hierarchical_scores not in SCORE_FORMATS:
        raise ValueError(
            f"hierarchical_scores must be one of {list(SCORE_FORMATS)}, got {hierarchical_scores!r}: 'dense' stores "
            f"cells × terms, 'sparse' each cell's {SPARSE_TOP} highest scores of at least {SPARSE_SCORE_MIN:g} (a CSR "
            "matrix), 'none' nothing."
        )


class PredictionAccumulator:
    """The per-cell calls and the per-cell matrices asked for, filled batch by batch with :meth:`add`.

    Memory: the kept outputs in float32 (``probabilities``: cells × labels; ``hierarchical_scores="dense"``: cells ×
    terms; ``"sparse"``: each cell's :data:`SPARSE_TOP` highest scores of at least :data:`SPARSE_SCORE_MIN`, at most
    ``SPARSE_TOP × 8`` bytes a cell; ``"none"``: nothing), plus one batch's subtree scores. No cells × terms matrix is
    built otherwise, whatever the number of cells.

    Parameters
    ----------
    hierarchy
        The model's hierarchy.
    n_cells
        Number of cells that :meth:`add` will receive, in order.
    coarse_threshold
        Subtree probability needed for the coarse call, in ``(0, 1]``.
    probabilities
        Keep the per-label probabilities.
    hierarchical_scores
        ``"dense"``, ``"sparse"`` or ``"none"``: which form of the subtree scores to keep.
    """

    def __init__(
        self,
        hierarchy: Hierarchy,
        n_cells: int,
        coarse_threshold: float,
        probabilities: bool = True,
        hierarchical_scores: str = "dense",
    ):
        check_score_format(hierarchical_scores)
        if not 0 < coarse_threshold <= 1:
            raise ValueError(f"coarse_threshold must be in (0, 1], got {coarse_threshold}.")
        n_labels, n_terms = hierarchy.n_labels, len(hierarchy.terms)
        self.hierarchy, self.n_cells, self.threshold = hierarchy, int(n_cells), float(coarse_threshold)
        self.hierarchical_scores = hierarchical_scores
        self.best = np.zeros(self.n_cells, dtype=np.int64)
        self.coarse = np.zeros(self.n_cells, dtype=np.int64)
        self.confidence = np.zeros(self.n_cells, dtype=np.float32)
        self.probabilities = np.zeros((self.n_cells, n_labels), np.float32) if probabilities else None
        self.scores = np.zeros((self.n_cells, n_terms), np.float32) if hierarchical_scores == "dense" else None
        self._sparse: tuple[list, list, list] = ([], [], [])  # per batch: entries per cell, columns, values
        self.filled = 0

    def add(self, probabilities: np.ndarray) -> None:
        """Score the next cells: ``(n, n_labels)`` per-label probabilities, rows in cell order."""
        p = np.asarray(probabilities, dtype=np.float64)
        start, stop = self.filled, self.filled + len(p)
        if stop > self.n_cells:
            raise ValueError(f"{stop} cells added to a prediction of {self.n_cells} cells.")
        best = p.argmax(axis=1)
        scores = self.hierarchy.subtree_scores(p)  # this batch only
        self.best[start:stop] = best
        self.confidence[start:stop] = p[np.arange(len(p)), best]
        self.coarse[start:stop] = self.hierarchy.coarse_terms(scores, self.threshold)
        if self.probabilities is not None:
            self.probabilities[start:stop] = p
        if self.scores is not None:
            self.scores[start:stop] = scores
        elif self.hierarchical_scores == "sparse":
            self._add_sparse(scores)
        self.filled = stop

    def _add_sparse(self, scores: np.ndarray) -> None:
        """Keep each row's :data:`SPARSE_TOP` highest scores of at least :data:`SPARSE_SCORE_MIN` (columns sorted)."""
        k = min(SPARSE_TOP, scores.shape[1])
        top = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
        values = np.take_along_axis(scores, top, axis=1)
        keep = values >= SPARSE_SCORE_MIN
        counts, columns, data = self._sparse
        counts.append(keep.sum(axis=1))
        columns.append(top[keep].astype(np.int32))
        data.append(values[keep].astype(np.float32))

    def frame(
        self,
        obs_names: pd.Index,
        key_added: str,
        empty: np.ndarray | None = None,
        min_confidence: float = 0.0,
        low_overlap: str | None = None,
    ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame | sp.csr_matrix]]:
        """The ``obs`` columns and the kept ``obsm`` matrices (by key), indexed by ``obs_names``.

        Cells are called ``"unassigned"``, with the reason in ``{key}_unassigned_reason``, when flagged in ``empty``
        (no expression in the model's genes: confidence 0; their probability rows are the model's output for a zero
        input), when ``low_overlap`` gives a reason (the query shares too few of the model's genes: every cell), or
        when their confidence is below ``min_confidence``. Their probabilities and (except empty cells) confidence
        stay as computed.
        """
        if self.filled != self.n_cells:
            raise ValueError(f"{self.filled} of {self.n_cells} cells were scored.")
        hierarchy = self.hierarchy
        labels = np.asarray(hierarchy.labels, dtype=object)
        terms = np.asarray(hierarchy.terms, dtype=object)
        pred_ids, pred_names = labels[self.best], np.asarray(hierarchy.names(labels), dtype=object)[self.best]
        coarse_ids = terms[self.coarse]
        coarse_names = np.asarray(hierarchy.names(hierarchy.terms), dtype=object)[self.coarse]
        confidence = self.confidence.copy()
        empty = np.zeros(self.n_cells, dtype=bool) if empty is None else np.asarray(empty, dtype=bool)
        reasons = unassigned_reasons(confidence, empty, min_confidence, low_overlap, key_added)
        unassigned = np.asarray(reasons.notna())
        for column in (pred_names, pred_ids, coarse_ids, coarse_names):
            column[unassigned] = UNASSIGNED
        confidence[empty] = 0.0
        obs = pd.DataFrame(
            {
                f"{key_added}_prediction": present_categorical(pred_names, hierarchy, names=True),
                f"{key_added}_prediction_ontology_term_id": present_categorical(pred_ids, hierarchy),
                f"{key_added}_confidence": confidence,
                f"{key_added}_prediction_coarse": present_categorical(coarse_names, hierarchy, names=True),
                f"{key_added}_prediction_coarse_ontology_term_id": present_categorical(coarse_ids, hierarchy),
                f"{key_added}_unassigned_reason": reasons,
            },
            index=obs_names,
        )
        obsm: dict[str, pd.DataFrame | sp.csr_matrix] = {}
        if self.probabilities is not None:
            obsm[f"{key_added}_probabilities"] = _frame(self.probabilities, obs_names, list(hierarchy.labels))
        if self.scores is not None:
            obsm[f"{key_added}_hierarchical_scores"] = _frame(self.scores, obs_names, list(hierarchy.terms))
        elif self.hierarchical_scores == "sparse":
            counts, columns, data = (np.concatenate(part) if part else np.zeros(0) for part in self._sparse)
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            matrix = (data.astype(np.float32), columns.astype(np.int32), indptr)
            obsm[f"{key_added}_hierarchical_scores"] = sp.csr_matrix(matrix, shape=(self.n_cells, len(terms)))
            self._sparse = ([], [], [])
        return obs, obsm


def _frame(values: np.ndarray, index: pd.Index, columns: list[str]) -> pd.DataFrame:
    """``values`` as a DataFrame without a copy (pandas ≥ 3 copies arrays unless told not to)."""
    return pd.DataFrame(values, index=index, columns=columns, copy=False)


def prediction_frame(
    probabilities: np.ndarray,
    hierarchy: Hierarchy,
    obs_names: pd.Index,
    key_added: str,
    coarse_threshold: float,
    empty: np.ndarray | None = None,
    min_confidence: float = 0.0,
    low_overlap: str | None = None,
    hierarchical_scores: str = "dense",
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame | sp.csr_matrix]]:
    """Per-cell predictions and the ``obsm`` matrices of a whole probability matrix, scored in chunks of cells.

    See :class:`PredictionAccumulator` (this is it, fed :data:`CHUNK_CELLS` rows at a time).

    Returns
    -------
    ``(obs columns, obsm matrices by key)``, indexed by ``obs_names``.
    """
    acc = PredictionAccumulator(hierarchy, len(probabilities), coarse_threshold, True, hierarchical_scores)
    for start in range(0, len(probabilities), CHUNK_CELLS):
        acc.add(probabilities[start : start + CHUNK_CELLS])
    return acc.frame(obs_names, key_added, empty, min_confidence, low_overlap)


def coarse_calls(probabilities: np.ndarray, hierarchy: Hierarchy, coarse_threshold: float) -> np.ndarray:
    """Index into ``hierarchy.terms`` of every cell's coarse call, scored :data:`CHUNK_CELLS` cells at a time."""
    acc = PredictionAccumulator(hierarchy, len(probabilities), coarse_threshold, False, "none")
    for start in range(0, len(probabilities), CHUNK_CELLS):
        acc.add(probabilities[start : start + CHUNK_CELLS])
    return acc.coarse


def unassigned_reasons(
    confidence: np.ndarray, empty: np.ndarray, min_confidence: float, low_overlap: str | None, key_added: str
) -> pd.Categorical:
    """Why each cell is unassigned (categorical; missing for an assigned cell): the first reason that applies."""
    low = confidence < min_confidence
    reasons = np.full(len(confidence), None, dtype=object)
    reasons[low] = f"confidence below {min_confidence:g}"
    if low_overlap is not None:
        reasons[:] = low_overlap
    reasons[empty] = NO_EXPRESSION
    column = f"obs[{key_added + '_unassigned_reason'!r}]"
    if empty.any():
        logger.warning(
            "%d of %d cell(s) have no expression in the model's genes: called %r with confidence 0 (reason in %s).",
            int(empty.sum()),
            len(empty),
            UNASSIGNED,
            column,
        )
    if low_overlap is not None:
        logger.warning("Every cell is called %r: %s (reason in %s).", UNASSIGNED, low_overlap, column)
    elif (low & ~empty).any():
        logger.info(
            "%d of %d cell(s) have a confidence below min_confidence=%g: called %r (reason in %s).",
            int((low & ~empty).sum()),
            len(low),
            min_confidence,
            UNASSIGNED,
            column,
        )
    present = [r for r in dict.fromkeys(reasons.tolist()) if r is not None]
    return pd.Categorical(reasons, categories=present)


def term_order(hierarchy: Hierarchy) -> list[str]:
    """Every term of ``hierarchy`` depth first (roots and children by name), each at its first visit.

    A stable order that keeps a subtree's terms together.
    """
    children: dict[str, list[str]] = {t: [] for t in hierarchy.terms}
    for parent, child in hierarchy.edges():
        children[parent].append(child)
    order: list[str] = []
    seen: set[str] = set()

    def visit(term: str) -> None:
        if term in seen:
            return
        seen.add(term)
        order.append(term)
        for child in sorted(children[term], key=hierarchy.name):
            visit(child)

    for root in sorted((t for t in hierarchy.terms if not hierarchy.parents(t)), key=hierarchy.name):
        visit(root)
    return order


def present_categorical(values, hierarchy: Hierarchy, names: bool = False) -> pd.Categorical:
    """``values`` (term IDs, or names with ``names=True``) as a categorical of the values present only.

    Categories follow the hierarchy's depth-first order; values outside the hierarchy (sorted), then ``"unassigned"``,
    come last.
    """
    values = np.asarray(values, dtype=object)
    order = term_order(hierarchy)
    if names:
        order = [hierarchy.name(t) for t in order]
    present = set(values.tolist())
    categories = [c for c in dict.fromkeys(order) if c in present]
    categories += sorted(str(v) for v in present - set(categories) if v != UNASSIGNED)
    categories += [UNASSIGNED] if UNASSIGNED in present else []
    return pd.Categorical(values, categories=categories)


def _palette() -> list[str]:
    """54 distinct colours: matplotlib's tab10, the light half of tab20, tab20b and tab20c, all without their greys.

    Greys are kept for ``"unassigned"`` and for categories outside the hierarchy.
    """
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colours = [to_hex(c) for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    colours += [to_hex(c) for i, c in enumerate(colormaps["tab20"].colors) if i % 2 and i != 15]
    return (
        colours + [to_hex(c) for c in colormaps["tab20b"].colors] + [to_hex(c) for c in colormaps["tab20c"].colors[:16]]
    )


def term_colors(hierarchy: Hierarchy) -> dict[str, str]:
    """One colour per term ID and per term name: labels first (depth first), then their ancestors.

    ``"unassigned"`` is light grey. The same model gives a label the same colour in every query and column.
    """
    order = term_order(hierarchy)
    labels = set(hierarchy.labels)
    ranked = [t for t in order if t in labels] + [t for t in order if t not in labels]
    palette = _palette()
    colours = {UNASSIGNED: UNASSIGNED_COLOR}
    for i, term in enumerate(ranked):
        colours[term] = colours[hierarchy.name(term)] = palette[i % len(palette)]
    return colours


def set_colors(
    adata: AnnData,
    columns: list[str],
    hierarchy: Hierarchy,
    label_map: Mapping[str, str] | None = None,
) -> list[str]:
    """Write ``uns["<column>_colors"]`` for categorical ``columns``, one colour per term shared by all of them.

    A category that is a term ID or name of ``hierarchy``, or a label that ``label_map`` maps to one (a truth column
    of free-text labels), gets that term's colour; any other gets a grey. Returns the ``uns`` keys written.
    """
    colours = term_colors(hierarchy)
    label_map = dict(label_map or {})
    written = []
    for column in columns:
        series = adata.obs[column]
        if not isinstance(series.dtype, pd.CategoricalDtype):
            series = series.astype("category")
            if series.cat.categories.tolist() != sorted(series.cat.categories.tolist()):
                continue  # the categories scanpy would make are not known here
        cats = [str(c) for c in series.cat.categories]
        others = iter(_GREYS * (len(cats) // len(_GREYS) + 1))
        adata.uns[f"{column}_colors"] = np.array(
            [colours.get(c) or colours.get(label_map.get(c, ""), None) or next(others) for c in cats], dtype=object
        )
        written.append(f"{column}_colors")
    return written


def write_outputs(
    adata: AnnData,
    obs: pd.DataFrame,
    obsm: dict[str, np.ndarray | pd.DataFrame],
    uns: dict,
    key_added: str,
    overwrite: bool = False,
) -> None:
    """Write predictions into ``adata``; only schce's own keys change, and overwriting them is logged.

    What is written is recorded in ``uns[key_added]["written"]``, so a later run knows which keys are schce's. Entries
    an earlier run wrote that this one does not (its majority vote, its hierarchical scores) are removed, so no stale
    output stays beside new ones.
    """
    planned = {"majority_voting": f"{key_added}_majority_voting" in obs.columns}
    planned["over_clustering"] = None if f"{key_added}_over_clustering" in obs.columns else "given"
    planned["hierarchical_scores"] = "dense" if f"{key_added}_hierarchical_scores" in obsm else "none"
    replaced = check_output_keys(adata, key_added, overwrite, **planned)
    if replaced:
        logger.info("Overwriting earlier schce outputs: %s.", ", ".join(replaced))
    before = written_before(adata, key_added)
    stale = sorted(f"obs[{k!r}]" for place, k in before if place == "obs" and k not in obs and k in adata.obs)
    stale += sorted(f"obsm[{k!r}]" for place, k in before if place == "obsm" and k not in obsm and k in adata.obsm)
    for place, key in sorted(before):
        if place == "obs" and key not in obs.columns and key in adata.obs.columns:
            del adata.obs[key]
            adata.uns.pop(f"{key}_colors", None)
        elif place == "obsm" and key not in obsm and key in adata.obsm:
            del adata.obsm[key]
    if stale:
        logger.info("Removed the earlier run's %s (not written by this run).", ", ".join(stale))
    for column in obs.columns:
        adata.obs[column] = (
            obs[column].to_numpy() if not isinstance(obs[column].dtype, pd.CategoricalDtype) else obs[column].values
        )
    for key, value in obsm.items():
        adata.obsm[key] = value
    adata.uns[key_added] = {**uns, "written": {"obs": list(obs.columns), "obsm": list(obsm)}}
