"""The :class:`CellOntology`: live terms, the ``is_a`` hierarchy, names, synonyms and obsolete terms."""

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from schce._graph import HierarchyCycleError, find_cycle
from schce.ontology._base import (
    _DICT_FORMAT,
    _DICT_FORMAT_VERSION,
    SYNONYM_SCOPES,
    _topological_order,
)
from schce.ontology._names import _NameResolution

logger = logging.getLogger(__name__)


class CellOntology(_NameResolution):
    """Immutable view of the Cell Ontology (CL): live terms, is_a parents, names, synonyms, obsolete terms.

    Live terms are the keys of ``names`` that are not in ``obsolete``. Usually built by :func:`load_cell_ontology`;
    the constructor takes plain data so that tests and other sources can build one.

    Parameters
    ----------
    names
        Term ID -> name, for live terms and (optionally) obsolete terms.
    parents
        Live term ID -> its direct ``is_a`` parents (live term IDs). Terms left out have no parents.
    synonyms
        Term ID -> ``[(synonym, scope), ...]`` with scope one of :data:`SYNONYM_SCOPES` (``""`` = unknown).
    obsolete
        Obsolete term ID -> its live CL replacement, or None when there is none in CL.
    alt_ids
        Alternative (merged) ID -> primary term ID.
    version
        Release of the ontology, e.g. ``"2026-03-26"``.
    source
        Where the data came from (file, URL or package), for provenance.

    Raises
    ------
    ValueError
        If the parents mention terms that are not live, if the ``is_a`` graph has a cycle (the message names it, e.g.
        ``'CL:1 -> CL:2 -> CL:1'``), or if synonyms or alternative IDs are inconsistent.

    """

    def __init__(
        self,
        names: Mapping[str, str],
        parents: Mapping[str, Iterable[str]],
        *,
        synonyms: Mapping[str, Iterable[tuple[str, str]]] | None = None,
        obsolete: Mapping[str, str | None] | None = None,
        alt_ids: Mapping[str, str] | None = None,
        consider: Mapping[str, Iterable[str]] | None = None,
        version: str = "unknown",
        source: str = "",
    ):
        # Obsolete terms without a replacement may name terms to 'consider' instead; one live candidate is followed.
        self._consider = {str(t): tuple(str(c) for c in cs) for t, cs in (consider or {}).items() if cs}
        self._names = {str(term): str(name) for term, name in names.items()}
        self._obsolete = {str(term): (None if repl is None else str(repl)) for term, repl in (obsolete or {}).items()}
        self._terms = tuple(sorted(term for term in self._names if term not in self._obsolete))
        self._live = frozenset(self._terms)
        self._version = str(version)
        self._source = str(source)

        given_parents: dict[str, tuple[str, ...]] = {}
        for child, ps in parents.items():
            if child not in self._live:
                raise ValueError(
                    f"Parents given for {child!r}, which is not a live term (it has no name or is obsolete)."
                )
            # A bare string would otherwise be split into characters.
            ps = (ps,) if isinstance(ps, str) else ps
            ps = tuple(sorted(set(ps)))
            bad = [p for p in ps if p not in self._live]
            if bad:
                raise ValueError(f"{child!r} has parents that are not live terms: {bad}.")
            given_parents[child] = ps
        self._parents = {term: given_parents.get(term, ()) for term in self._terms}
        cycle = find_cycle(self._parents)
        if cycle is not None:
            raise HierarchyCycleError(f"The is_a hierarchy has a cycle: {' -> '.join(cycle)}.")
        children: dict[str, list[str]] = {term: [] for term in self._terms}
        for term, ps in self._parents.items():
            for parent in ps:
                children[parent].append(term)
        self._children = {term: tuple(sorted(cs)) for term, cs in children.items()}

        self._synonyms: dict[str, tuple[tuple[str, str], ...]] = {}
        for term, syns in (synonyms or {}).items():
            if term not in self._names:
                raise ValueError(f"Synonyms given for {term!r}, which has no name.")
            pairs = tuple((str(text), str(scope)) for text, scope in syns)
            bad_scopes = sorted({scope for _, scope in pairs} - set(SYNONYM_SCOPES))
            if bad_scopes:
                raise ValueError(f"Synonyms of {term!r} have unknown scopes {bad_scopes}; expected {SYNONYM_SCOPES}.")
            if pairs:
                self._synonyms[term] = pairs

        self._alt_ids: dict[str, str] = {}
        for alt, primary in (alt_ids or {}).items():
            if alt in self._names:
                raise ValueError(f"Alternative ID {alt!r} is also a term of its own.")
            if primary not in self._names:
                raise ValueError(f"Alternative ID {alt!r} points to {primary!r}, which is not a term.")
            self._alt_ids[str(alt)] = str(primary)

        # Filled on first use: most callers need only a few of them.
        self._ancestor_sets: dict[str, frozenset[str]] | None = None
        self._descendant_sets: dict[str, frozenset[str]] | None = None
        self._name_index: tuple[dict[str, set[str]], ...] | None = None
        self._close_names: dict[str, str] | None = None
        self._warned: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ basics

    @property
    def version(self) -> str:
        """Release of the ontology, e.g. ``"2026-03-26"``."""
        return self._version

    @property
    def source(self) -> str:
        """Where the data came from (file, URL or package)."""
        return self._source

    @property
    def terms(self) -> tuple[str, ...]:
        """Live term IDs, sorted."""
        return self._terms

    def __contains__(self, term_id: object) -> bool:
        return isinstance(term_id, str) and term_id in self._live

    def __len__(self) -> int:
        return len(self._terms)

    def __repr__(self) -> str:
        return f"CellOntology(version={self._version!r}, terms={len(self)}, source={self._source!r})"

    def _content(self) -> tuple:
        return (self._version, self._names, self._parents, self._synonyms, self._obsolete, self._alt_ids)

    def __eq__(self, other: object) -> bool:
        # Provenance (source) is deliberately ignored: the same release read from two places is the same ontology.
        if not isinstance(other, CellOntology):
            return NotImplemented
        return self._content() == other._content()

    def __hash__(self) -> int:
        return hash((self._version, self._terms))

    def __getstate__(self) -> dict[str, Any]:
        # Caches are cheap to rebuild and would bloat pickles saved with models.
        state = self.__dict__.copy()
        state.update(_ancestor_sets=None, _descendant_sets=None, _name_index=None, _close_names=None, _warned=set())
        return state

    def _unknown(self, term_id: str) -> KeyError:
        """The error for a term ID that is not live, saying what it is instead."""
        if term_id in self._obsolete:
            repl = self._obsolete[term_id]
            hint = f"; it is replaced by {repl!r}" if repl else "; it has no CL replacement"
            return KeyError(f"{term_id!r} is an obsolete Cell Ontology term{hint} (see CellOntology.resolve).")
        if term_id in self._alt_ids:
            return KeyError(f"{term_id!r} is an alternative ID of {self._alt_ids[term_id]!r}; use the primary ID.")
        return KeyError(f"{term_id!r} is not a term of this Cell Ontology (version {self._version}).")

    def _require_live(self, term_id: str) -> None:
        if term_id not in self._live:
            raise self._unknown(term_id)

    # ------------------------------------------------------------------ names

    def name(self, term_id: str) -> str:
        """Name of a live or obsolete term.

        Raises
        ------
        KeyError
            If ``term_id`` is not a term of this ontology.

        """
        if term_id in self._names:
            return self._names[term_id]
        raise self._unknown(term_id)

    def names(self, term_ids: Iterable[str]) -> list[str]:
        """Names of several terms, in order (see :meth:`name`)."""
        return [self.name(term) for term in term_ids]

    def synonyms(self, term_id: str) -> tuple[tuple[str, str], ...]:
        """``(synonym, scope)`` pairs of a live or obsolete term (empty when it has none)."""
        if term_id not in self._names:
            raise self._unknown(term_id)
        return self._synonyms.get(term_id, ())

    # ------------------------------------------------------------------ hierarchy

    def parents(self, term_id: str) -> tuple[str, ...]:
        """Direct ``is_a`` parents of a live term, sorted."""
        self._require_live(term_id)
        return self._parents[term_id]

    def children(self, term_id: str) -> tuple[str, ...]:
        """Direct ``is_a`` children of a live term, sorted."""
        self._require_live(term_id)
        return self._children[term_id]

    def _closures(self) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
        # All closures at once in topological order: one pass each, a few ms for the full CL.
        if self._ancestor_sets is None or self._descendant_sets is None:
            order = _topological_order(self._parents)
            ancestors: dict[str, frozenset[str]] = {}
            for term in order:
                acc: set[str] = set(self._parents[term])
                for parent in self._parents[term]:
                    acc |= ancestors[parent]
                ancestors[term] = frozenset(acc)
            descendants: dict[str, frozenset[str]] = {}
            for term in reversed(order):
                acc = set(self._children[term])
                for child in self._children[term]:
                    acc |= descendants[child]
                descendants[term] = frozenset(acc)
            self._ancestor_sets, self._descendant_sets = ancestors, descendants
        return self._ancestor_sets, self._descendant_sets

    def ancestors(self, term_id: str, include_self: bool = False) -> frozenset[str]:
        """All ``is_a`` ancestors of a live term (transitive closure)."""
        self._require_live(term_id)
        result = self._closures()[0][term_id]
        return result | {term_id} if include_self else result

    def descendants(self, term_id: str, include_self: bool = False) -> frozenset[str]:
        """All ``is_a`` descendants of a live term (transitive closure)."""
        self._require_live(term_id)
        result = self._closures()[1][term_id]
        return result | {term_id} if include_self else result

    def edges(self) -> list[tuple[str, str]]:
        """``(parent, child)`` pairs of the ``is_a`` hierarchy among live terms, sorted."""
        return sorted((parent, child) for child, ps in self._parents.items() for parent in ps)

    # ------------------------------------------------------------------ obsolete terms

    def is_obsolete(self, term_id: str) -> bool:
        """Whether ``term_id`` is an obsolete term of this ontology."""
        return term_id in self._obsolete

    def subset(self, term_ids: Iterable[str]) -> "CellOntology":
        """The given live terms plus all their ancestors, as a new ontology of the same version.

        Obsolete terms replaced by a kept term, and alternative IDs of kept terms, are kept too so that old labels
        still resolve.

        Raises
        ------
        KeyError
            If a term is not live.

        """
        keep: set[str] = set()
        for term in term_ids:
            keep |= self.ancestors(term, include_self=True)
        obsolete = {term: repl for term, repl in self._obsolete.items() if repl in keep}
        named = keep | {term for term in obsolete if term in self._names}
        return CellOntology(
            names={term: self._names[term] for term in sorted(named)},
            parents={term: self._parents[term] for term in sorted(keep) if self._parents[term]},
            synonyms={term: list(syns) for term, syns in self._synonyms.items() if term in named},
            obsolete=obsolete,
            alt_ids={alt: primary for alt, primary in self._alt_ids.items() if primary in named},
            version=self._version,
            source=f"subset of {self._source}" if self._source else "subset",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data (see :meth:`from_dict`)."""
        return {
            "format": _DICT_FORMAT,
            "format_version": _DICT_FORMAT_VERSION,
            "version": self._version,
            "source": self._source,
            "names": dict(sorted(self._names.items())),
            "parents": {term: list(ps) for term, ps in self._parents.items() if ps},
            "synonyms": {term: [list(pair) for pair in syns] for term, syns in sorted(self._synonyms.items())},
            "obsolete": dict(sorted(self._obsolete.items())),
            "alt_ids": dict(sorted(self._alt_ids.items())),
            "consider": {term: list(cs) for term, cs in sorted(self._consider.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CellOntology":
        """Rebuild an ontology from :meth:`to_dict` output.

        Raises
        ------
        ValueError
            If ``data`` is not :meth:`to_dict` output of a supported format version.

        """
        if data.get("format", _DICT_FORMAT) != _DICT_FORMAT or "names" not in data:
            raise ValueError(f"Not a saved CellOntology (expected format {_DICT_FORMAT!r} with 'names').")
        if int(data.get("format_version", _DICT_FORMAT_VERSION)) > _DICT_FORMAT_VERSION:
            raise ValueError(
                f"Saved CellOntology has format version {data['format_version']}, newer than this schce "
                f"supports ({_DICT_FORMAT_VERSION}); upgrade schce."
            )
        return cls(
            names=data["names"],
            parents=data.get("parents", {}),
            synonyms={term: [tuple(pair) for pair in syns] for term, syns in data.get("synonyms", {}).items()},
            obsolete=data.get("obsolete", {}),
            alt_ids=data.get("alt_ids", {}),
            consider=data.get("consider", {}),
            version=data.get("version", "unknown"),
            source=data.get("source", ""),
        )


# ---------------------------------------------------------------------- loaders
