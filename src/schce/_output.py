"""The prediction output contract (see DESIGN.md): per-batch scoring, present categories in hierarchy order, colours."""

from __future__ import annotations

import logging
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
