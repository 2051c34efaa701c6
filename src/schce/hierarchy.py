"""Label hierarchies: the reachability matrix, validation, and the correctness rule."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from schce._graph import HierarchyCycleError, ancestor_sets, depths, find_cycle, validate_reachability

if TYPE_CHECKING:
    import torch

    from schce.ontology import CellOntology

logger = logging.getLogger(__name__)

#: How a label's annotation is read: its subtree less the other labels its source uses below it, always its whole
#: subtree (HCE), or only itself (cross-entropy). See :meth:`Hierarchy.annotation_targets`.
LABEL_SEMANTICS = ("auto", "inclusive", "exclusive")


class Hierarchy:
    """An ordered set of labels placed in a directed acyclic hierarchy.

    The hierarchy holds every term that matters for a model: its ``labels`` (the outputs, in order)
    and all of their ancestors (``terms``). Edges go parent → child.

    Parameters
    ----------
    labels
        The model's labels, in output order.
    edges
        ``(parent, child)`` pairs. Terms that are not labels may appear (they become ancestor terms).
    names
        Optional display names per term; missing ones display as the term itself.
    version
        Version of the source the edges come from (e.g. the Cell Ontology release).

    Attributes
    ----------
    R
        ``(n_labels, n_labels)`` reachability matrix: ``R[i, j] = 1`` iff label ``j`` is label ``i`` or one of
        its descendants.
    term_matrix
        ``(n_terms, n_labels)``: ``term_matrix[t, j] = 1`` iff label ``j`` is term ``t`` or one of its
        descendants. The first ``n_labels`` rows equal ``R``.
    term_reach
        ``(n_terms, n_terms)``: the same relation over all terms (``term_matrix`` is its label columns).

    Examples
    --------
    The example of the HCE paper:

    >>> h = Hierarchy.from_edges([("A", "B"), ("A", "C"), ("B", "D"), ("B", "E"), ("C", "E")])
    >>> h.R.astype(int)
    array([[1, 1, 1, 1, 1],
           [0, 1, 0, 1, 1],
           [0, 0, 1, 0, 1],
           [0, 0, 0, 1, 0],
           [0, 0, 0, 0, 1]])
    """

    def __init__(
        self,
        labels: Sequence[str],
        edges: Iterable[tuple[str, str]],
        names: dict[str, str] | None = None,
        version: str = "unknown",
    ):
        labels = [str(label) for label in labels]
        if len(labels) == 0:
            raise ValueError("A hierarchy needs at least one label.")
        if len(set(labels)) != len(labels):
            dup = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"Labels must be unique; repeated: {dup}.")
        parents: dict[str, set[str]] = {}
        for parent, child in edges:
            parent, child = str(parent), str(child)
            if parent == child:
                raise HierarchyCycleError(f"The hierarchy has a cycle: {parent} -> {parent}. Remove that edge.")
            parents.setdefault(child, set()).add(parent)
            parents.setdefault(parent, set())
        for label in labels:
            parents.setdefault(label, set())
        cycle = find_cycle({t: tuple(sorted(ps)) for t, ps in parents.items()})
        if cycle:
            # find_cycle lists child before parent; show it parent -> child like the edges.
            raise HierarchyCycleError(
                "The hierarchy has a cycle: " + " -> ".join(reversed(cycle)) + ". Remove one of these edges."
            )

        # Keep only labels and their ancestors: anything else cannot affect scores.
        keep = set(labels)
        stack = list(labels)
        while stack:
            for p in parents[stack.pop()]:
                if p not in keep:
                    keep.add(p)
                    stack.append(p)
        self._parents = {t: tuple(sorted(parents[t] & keep)) for t in keep}
        self.labels: tuple[str, ...] = tuple(labels)
        self.terms: tuple[str, ...] = self.labels + tuple(sorted(keep - set(labels)))
        self.version = version
        self._names = {t: (names or {}).get(t, t) for t in self.terms}
        self._index = {t: i for i, t in enumerate(self.terms)}

        self._ancestors = ancestor_sets(self._parents, self.terms)
        n_labels, n_terms = len(self.labels), len(self.terms)
        # reach[i, j]: term j is term i or one of its descendants (the closure over all terms).
        reach = np.eye(n_terms, dtype=bool)
        for t in self.terms:
            for a in self._ancestors[t]:
                reach[self._index[a], self._index[t]] = True
        self.term_reach = reach
        self.term_matrix = reach[:, :n_labels]
        self.R = reach[:n_labels, :n_labels].copy()
        self.depth = depths(self._parents, self.terms)
        validate_reachability(self.R)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_edges(
        cls,
        edges: Iterable[tuple[str, str]],
        labels: Sequence[str] | None = None,
        names: dict[str, str] | None = None,
    ) -> Hierarchy:
        """Build a hierarchy of any domain from ``(parent, child)`` edges.

        Parameters
        ----------
        edges
            ``(parent, child)`` pairs.
        labels
            The labels in output order; default: every node of the edges, sorted.
        names
            Optional display names.
        """
        edges = [(str(p), str(c)) for p, c in edges]
        if labels is None:
            labels = sorted({t for edge in edges for t in edge})
        return cls(labels, edges, names=names)

    @classmethod
    def from_ontology(cls, labels: Sequence[str], ontology: CellOntology | str | None = None) -> Hierarchy:
        """Build the hierarchy of Cell Ontology labels (CL IDs) from the ontology's ``is_a`` relations.

        Parameters
        ----------
        labels
            CL term IDs, in output order.
        ontology
            A :class:`~schce.ontology.CellOntology`, an OBO path or URL; default: the embedded CL release.
        """
        from schce.ontology import load_cell_ontology

        onto = load_cell_ontology(ontology)
        missing = [label for label in labels if label not in onto]
        if missing:
            raise ValueError(
                f"{len(missing)} label(s) are not live terms of the Cell Ontology {onto.version}: {missing}. "
                "Map them with `ontology.map_labels` or pass a newer ontology."
            )
        terms = set(labels)
        for label in labels:
            terms |= onto.ancestors(label)
        edges = [(p, t) for t in terms for p in onto.parents(t)]
        names = {t: onto.name(t) for t in terms}
        return cls(labels, edges, names=names, version=onto.version)

    @classmethod
    def from_child_matrix(
        cls,
        labels: Sequence[str],
        matrix,
        names: dict[str, str] | None = None,
        version: str = "child matrix",
    ) -> Hierarchy:
        """Build the hierarchy a published model was trained with, from its label-by-label matrix.

        scTab's ``cell_type_hierarchy/child_matrix.npy`` and the ``child_lookup`` buffer of scTab / HCE-paper
        checkpoints hold ``matrix[i, j] != 0`` iff label ``j`` is label ``i`` or one of its descendants. The
        hierarchy keeps exactly these relations between the labels (no other ontology terms), so its :attr:`R`
        equals the matrix.

        Parameters
        ----------
        labels
            The labels (CL IDs), in the matrix's order.
        matrix
            ``(n_labels, n_labels)`` array or tensor.
        names, version
            Display names and a version string.

        Raises
        ------
        ValueError
            If the shape does not fit the labels, or the matrix is not a partial order (not reflexive or not
            transitive); :class:`~schce.HierarchyCycleError` if two labels are descendants of each other.
        """
        R = np.asarray(matrix.detach().cpu().numpy() if hasattr(matrix, "detach") else matrix) != 0
        labels = [str(label) for label in labels]
        if R.shape != (len(labels), len(labels)):
            raise ValueError(f"The child matrix has shape {R.shape}; expected {(len(labels),) * 2} for the labels.")
        try:
            validate_reachability(R)
        except HierarchyCycleError:
            raise
        except ValueError as err:
            raise ValueError(
                f"The child matrix is not a label hierarchy: {err} Pass the matrix the model was trained with "
                "(scTab's child_matrix.npy / the checkpoint's child_lookup buffer)."
            ) from err
        # Keep only direct edges (the transitive reduction); the closure gives R back.
        strict = R & ~np.eye(len(labels), dtype=bool)
        direct = strict & ~((strict.astype(np.int64) @ strict.astype(np.int64)) > 0)
        edges = [(labels[i], labels[j]) for i, j in zip(*np.nonzero(direct), strict=True)]
        return cls(labels, edges, names=names, version=version)

    # ------------------------------------------------------------------ queries
    @property
    def n_labels(self) -> int:
        """Number of labels."""
        return len(self.labels)

    def name(self, term: str) -> str:
        """Display name of a term."""
        return self._names[term]

    def names(self, terms: Iterable[str] | None = None) -> list[str]:
        """Display names of ``terms`` (default: the labels)."""
        return [self._names[t] for t in (self.labels if terms is None else terms)]

    def parents(self, term: str) -> tuple[str, ...]:
        """Direct parents of ``term``."""
        return self._parents[term]

    def edges(self) -> list[tuple[str, str]]:
        """All ``(parent, child)`` edges among the terms."""
        return [(p, t) for t in self.terms for p in self._parents[t]]

    def ancestors(self, term: str, include_self: bool = False) -> set[str]:
        """Ancestors of ``term`` among the hierarchy's terms."""
        out = set(self._ancestors[term])
        return out | {term} if include_self else out

    def descendants(self, term: str, include_self: bool = False) -> set[str]:
        """Descendants of ``term`` among the hierarchy's terms."""
        out = {self.terms[j] for j in np.flatnonzero(self.term_reach[self._index[term]])}
        return out if include_self else out - {term}

    def label_index(self, labels: Iterable[str]) -> np.ndarray:
        """Positions of ``labels`` in :attr:`labels`; ``-1`` where a value is not a label."""
        n = self.n_labels
        return np.array([self._index[x] if self._index.get(x, n) < n else -1 for x in labels], dtype=np.int64)

    def reachability(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
        """``R`` as a torch tensor (default float32), for the loss."""
        import torch

        return torch.as_tensor(self.R, dtype=dtype or torch.float32, device=device)

    def is_correct(self, predicted: Sequence[str] | np.ndarray, true: Sequence[str] | np.ndarray) -> np.ndarray:
        """The scTab correctness rule, per cell.

        A prediction is correct when it is the true label or one of its descendants; an ancestor is wrong.

        Parameters
        ----------
        predicted, true
            Terms of the hierarchy, one per cell.

        Returns
        -------
        Boolean array, one value per cell. A true term outside the hierarchy is correct only on an exact match.
        """
        predicted, true = np.asarray(predicted, dtype=object), np.asarray(true, dtype=object)
        if predicted.shape != true.shape:
            raise ValueError(f"predicted and true differ in length: {predicted.shape} vs {true.shape}.")
        terms = pd.Index(self.terms)
        t, p = terms.get_indexer(true), terms.get_indexer(predicted)
        known = (t >= 0) & (p >= 0)
        out = predicted == true
        out[known] = self.term_reach[t[known], p[known]]
        return out

    def correct_predictions(self, predicted: Sequence[str], true: Sequence[str]) -> np.ndarray:
        """Predictions with every correct-by-the-rule call replaced by the true label (for corrected metrics)."""
        predicted = np.asarray(predicted, dtype=object)
        true = np.asarray(true, dtype=object)
        return np.where(self.is_correct(predicted, true), true, predicted)

    def annotation_targets(
        self,
        codes: np.ndarray,
        sources: np.ndarray | None = None,
        semantics: str = "auto",
    ) -> tuple[np.ndarray, np.ndarray]:
        """The labels each cell's annotation can mean, as target masks for :func:`~schce.losses.log_mask_probability`.

        With ``semantics="auto"`` a label means its subtree minus the subtrees of the other labels that the same
        annotation source also uses below it: a source that labels both CD14 and CD16 monocytes means "CD14, not
        CD16" by "CD14 monocyte", while a source that only ever says "monocyte" may mean any monocyte.
        ``"inclusive"`` always takes the whole subtree (plain HCE), ``"exclusive"`` only the label itself (plain
        cross-entropy).

        Parameters
        ----------
        codes
            ``(n_cells,)`` label indices into :attr:`labels`.
        sources
            ``(n_cells,)`` annotation source of each cell (dataset, study or batch); ``None`` treats all cells as
            one source.
        semantics
            ``"auto"``, ``"inclusive"`` or ``"exclusive"``.

        Returns
        -------
        masks
            ``(n_masks, n_labels)`` bool, the distinct acceptable sets; every row contains its own label.
        rows
            ``(n_cells,)`` int64, each cell's row of ``masks``.
        """
        if semantics not in LABEL_SEMANTICS:
            raise ValueError(f"semantics must be one of {LABEL_SEMANTICS}, got {semantics!r}.")
        codes = np.asarray(codes, dtype=np.int64)
        if codes.size and (codes.min() < 0 or codes.max() >= self.n_labels):
            raise ValueError(
                f"codes must index the {self.n_labels} labels, got values in [{codes.min()}, {codes.max()}]."
            )
        if semantics != "auto":
            return self.annotation_masks(np.ones((1, self.n_labels), dtype=bool), semantics)[0], codes.copy()
        if sources is None:
            sources = np.zeros(len(codes), dtype=np.int64)
        sources = np.asarray(sources)
        if sources.shape != codes.shape:
            raise ValueError(f"sources and codes differ in length: {sources.shape} vs {codes.shape}.")
        source_codes, source_index = np.unique(sources, return_inverse=True)
        source_index = source_index.ravel()
        used = np.zeros((len(source_codes), self.n_labels), dtype=bool)
        used[source_index, codes] = True
        masks, pair_rows = self.annotation_masks(used, semantics)
        return masks, pair_rows[source_index, codes]

    def annotation_masks(self, used: np.ndarray, semantics: str = "auto") -> tuple[np.ndarray, np.ndarray]:
        """Acceptable-label masks from which labels each annotation source uses (see :meth:`annotation_targets`).

        This is the step that needs no cells: a data module that cannot hold its cells in memory counts
        ``used`` in one pass over its label and source columns and gets the same masks as
        :meth:`annotation_targets` on the same cells.

        Parameters
        ----------
        used
            ``(n_sources, n_labels)`` bool: ``used[s, l]`` when source ``s`` annotates at least one cell ``l``.
        semantics
            ``"auto"``, ``"inclusive"`` or ``"exclusive"``.

        Returns
        -------
        masks
            ``(n_masks, n_labels)`` bool, the distinct acceptable sets of the used pairs (``"inclusive"``: ``R``,
            ``"exclusive"``: the identity, whatever is used).
        pair_rows
            ``(n_sources, n_labels)`` int64: the row of ``masks`` of a cell of source ``s`` labelled ``l``;
            ``-1`` for pairs not in ``used``.
        """
        if semantics not in LABEL_SEMANTICS:
            raise ValueError(f"semantics must be one of {LABEL_SEMANTICS}, got {semantics!r}.")
        used = np.asarray(used, dtype=bool)
        if used.ndim != 2 or used.shape[1] != self.n_labels:
            raise ValueError(f"used must be (n_sources, {self.n_labels} labels), got shape {used.shape}.")
        pair_rows = np.full(used.shape, -1, dtype=np.int64)
        if semantics != "auto":
            pair_rows[used] = np.nonzero(used)[1]
            return (self.R.copy() if semantics == "inclusive" else np.eye(self.n_labels, dtype=bool)), pair_rows
        R = self.R
        Rf = R.astype(np.float32)
        strict = R & ~np.eye(self.n_labels, dtype=bool)
        sources, labels = np.nonzero(used)  # row-major: the pair order of source * n_labels + label
        flat = np.empty((len(sources), self.n_labels), dtype=bool)
        for s in np.unique(sources):  # one source at a time: memory n_labels², whatever the number of sources
            at = np.flatnonzero(sources == s)
            # R[l] minus the subtrees of labels m that source s uses strictly below l.
            blocked = (strict[labels[at]] & used[s][None, :]).astype(np.float32) @ Rf
            flat[at] = R[labels[at]] & (blocked == 0)
        if not len(flat):
            return np.zeros((0, self.n_labels), dtype=bool), pair_rows
        masks, mask_rows = np.unique(flat, axis=0, return_inverse=True)
        pair_rows[sources, labels] = mask_rows.ravel()
        return masks, pair_rows

    def subtree_scores(self, probabilities: np.ndarray) -> np.ndarray:
        """Subtree probabilities of every term: ``probabilities @ term_matrix.T``.

        Parameters
        ----------
        probabilities
            ``(n_cells, n_labels)`` per-label probabilities.

        Returns
        -------
        ``(n_cells, n_terms)``: for term ``t``, the summed probability of ``t`` and its descendant labels.
        """
        return np.asarray(probabilities, dtype=np.float64) @ self.term_matrix.T.astype(np.float64)

    def coarse_terms(self, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """The most specific term whose subtree score reaches ``threshold``, per cell.

        Among the terms with score ≥ ``threshold`` the deepest wins; ties go to the higher score.
        The root of a single-rooted hierarchy always qualifies, so every cell gets a term; a cell with no
        qualifying term gets its best-scoring term.

        Parameters
        ----------
        scores
            ``(n_cells, n_terms)`` from :meth:`subtree_scores`.
        threshold
            Minimum subtree probability, in ``(0, 1]``.

        Returns
        -------
        Indices into :attr:`terms`.
        """
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}.")
        # Scores are ≤ 1, so depth + score orders by depth first and score second.
        key = np.where(scores >= threshold - 1e-9, self.depth[None, :] + np.clip(scores, 0, 1) * 0.5, -np.inf)
        best = key.argmax(axis=1)
        none = ~np.isfinite(key.max(axis=1))
        best[none] = scores[none].argmax(axis=1)
        return best

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        """A JSON-able description (labels, edges, names, version)."""
        return {"labels": list(self.labels), "edges": self.edges(), "names": dict(self._names), "version": self.version}

    @classmethod
    def from_dict(cls, d: dict) -> Hierarchy:
        """Inverse of :meth:`to_dict`."""
        return cls(
            d["labels"], [tuple(e) for e in d["edges"]], names=d.get("names"), version=d.get("version", "unknown")
        )

    def __repr__(self) -> str:
        return f"Hierarchy(n_labels={self.n_labels}, n_terms={len(self.terms)}, version={self.version!r})"


def compare_hierarchy(child_matrix: np.ndarray, labels, ontology=None) -> pd.DataFrame:
    """Relations where a published ``child_matrix`` (a scTab store's or a checkpoint's) and the Cell Ontology disagree.

    Parameters
    ----------
    child_matrix
        ``(n_labels, n_labels)``, ``[i, j]`` non-zero iff label ``j`` is label ``i`` or one of its descendants.
    labels
        CL IDs of the labels, in code order.
    ontology
        :class:`~schce.ontology.CellOntology` or source; default: the embedded release.

    Returns
    -------
    One row per disagreeing ``(ancestor, descendant)`` pair of labels: ``ancestor``, ``descendant``, their names,
    ``in_store`` and ``in_ontology`` (exactly one is true). Empty when they agree.
    """
    from schce.ontology import load_cell_ontology

    onto = load_cell_ontology(ontology)
    labels = [str(x) for x in labels]
    store = np.asarray(child_matrix) != 0
    if store.shape != (len(labels), len(labels)):
        raise ValueError(
            f"child_matrix has shape {store.shape}; expected ({len(labels)}, {len(labels)}) for the labels."
        )
    ref = Hierarchy.from_ontology(labels, onto).R
    i, j = np.nonzero(store != ref)
    return pd.DataFrame(
        {
            "ancestor": [labels[k] for k in i],
            "descendant": [labels[k] for k in j],
            "ancestor_name": [onto.name(labels[k]) for k in i],
            "descendant_name": [onto.name(labels[k]) for k in j],
            "in_store": store[i, j],
            "in_ontology": ref[i, j],
        }
    )
