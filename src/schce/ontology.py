"""The Cell Ontology (CL): live terms, the ``is_a`` hierarchy, names, synonyms and obsolete terms.

:func:`load_cell_ontology` reads the CL release embedded in ``cellxgene-ontology-guide`` (the default, works offline)
or a CL file in OBO format (path or URL). Both give a :class:`CellOntology`, an immutable view that can also be built
from plain data, saved with a model (:meth:`CellOntology.to_dict`) and used to map free-text cell-type labels to CL
IDs (:meth:`CellOntology.resolve`, :meth:`CellOntology.map_labels`).
"""

import difflib
import functools
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any

from schce._graph import HierarchyCycleError, find_cycle

logger = logging.getLogger(__name__)

__all__ = ["SYNONYM_SCOPES", "CellOntology", "LabelMappingError", "load_cell_ontology"]

#: Synonym scopes of the OBO format; ``""`` marks a synonym whose scope the source does not record.
SYNONYM_SCOPES = ("EXACT", "RELATED", "NARROW", "BROAD", "")

_ROOT = "CL:0000000"
_URL_PREFIXES = ("http://", "https://", "ftp://")
# CL IDs are also written as CL_0000084 or as full PURLs (http://purl.obolibrary.org/obo/CL_0000084) in the wild.
_ID_RE = re.compile(r"^(?:\S*[/#])?CL[:_](\d{7})$", re.IGNORECASE)
_SYNONYM_RE = re.compile(r'^"((?:[^"\\]|\\.)*)"\s*([A-Za-z_]+)?')
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DICT_FORMAT = "schce.CellOntology"
_DICT_FORMAT_VERSION = 1
_FIX_HINT = (
    "To fix this, use CL IDs such as 'CL:0000084' or exact CL names or synonyms such as 'T cell', e.g. by renaming "
    "the labels before training; if the labels come from a newer CL release, pass ontology= the path or URL of a "
    "newer CL OBO file (e.g. https://purl.obolibrary.org/obo/cl/cl-simple.obo)."
)


class LabelMappingError(ValueError):
    """Some cell-type labels could not be mapped to live Cell Ontology terms.

    Parameters
    ----------
    message
        The full error message (lists every unmapped label with close CL names).
    unmapped
        The labels that could not be mapped, sorted.

    """

    def __init__(self, message: str, unmapped: Iterable[str] | None = None):
        super().__init__(message)
        # Optional so that the exception survives pickling, which re-creates it from the message alone.
        self.unmapped: list[str] = list(unmapped) if unmapped is not None else []


def _normalise(text: str) -> str:
    """Case-fold and collapse whitespace so that names match regardless of spacing and case."""
    return " ".join(text.split()).casefold()


def _is_null(value: Any) -> bool:
    """Whether ``value`` is a missing value (None, NaN, ``pd.NA``, ``pd.NaT``) without importing pandas."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return type(value).__name__ in {"NAType", "NaTType"}


def _topological_order(parents: Mapping[str, tuple[str, ...]]) -> list[str]:
    """Terms ordered so that every term comes after all its parents (Kahn's algorithm; the graph is acyclic)."""
    pending = {term: len(ps) for term, ps in parents.items()}
    children: dict[str, list[str]] = {term: [] for term in parents}
    for term, ps in parents.items():
        for parent in ps:
            children[parent].append(term)
    ready = sorted(term for term, n in pending.items() if n == 0)
    order: list[str] = []
    while ready:
        term = ready.pop()
        order.append(term)
        for child in children[term]:
            pending[child] -= 1
            if pending[child] == 0:
                ready.append(child)
    return order


class CellOntology:
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

    def replacement(self, term_id: str) -> str | None:
        """The CL term that replaces an obsolete term (None if there is none, or if the term is live).

        Raises
        ------
        KeyError
            If ``term_id`` is neither a live nor an obsolete term.

        """
        if term_id in self._obsolete:
            return self._obsolete[term_id]
        self._require_live(term_id)
        return None

    # ------------------------------------------------------------------ label mapping

    def _follow(self, term_id: str, seen: list[str] | None = None) -> str | None:
        """The live term an ID leads to through alternative IDs, ``replaced_by`` and a single ``consider``."""
        seen = [term_id] if seen is None else seen
        current: str | None = term_id
        # Follow alternative IDs and replacement chains (a replacement may itself have been obsoleted later).
        while current is not None and current not in self._live:
            if current in self._alt_ids:
                current = self._alt_ids[current]
            elif self._obsolete.get(current) is not None:
                current = self._obsolete[current]
            elif current in self._obsolete:
                options = self._consider_options(current, seen)
                current = options[0] if len(options) == 1 else None
            else:
                current = None
            if current in seen:
                current = None
            elif current is not None:
                seen.append(current)
        return current

    def _consider_options(self, term_id: str, seen: list[str] | None = None) -> list[str]:
        """Distinct live terms that the ``consider`` entries of an obsolete term without replacement lead to."""
        found = []
        for raw in self._consider.get(term_id, ()):
            match = re.search(r"CL[:_](\d{7})$", raw)
            if match and (f"CL:{match.group(1)}" not in (seen or [])):
                live = self._follow(f"CL:{match.group(1)}", [*(seen or [term_id])])
                if live is not None and live not in found:
                    found.append(live)
        return found

    def _resolve_id(self, term_id: str) -> str | None:
        seen = [term_id]
        current = self._follow(term_id, seen)
        if current is None:
            logger.debug("%s does not lead to a live term of CL %s", term_id, self._version)
            return None
        if any(step in self._obsolete for step in seen) and (term_id, current) not in self._warned:
            self._warned.add((term_id, current))
            logger.warning(
                "Obsolete Cell Ontology term %s (%s) was mapped to its replacement %s (%s).",
                term_id,
                self._names.get(term_id, "no name"),
                current,
                self._names[current],
            )
        return current

    def _names_by_tier(self) -> tuple[dict[str, set[str]], ...]:
        if self._name_index is None:
            labels: dict[str, set[str]] = {}
            exact: dict[str, set[str]] = {}
            anysyn: dict[str, set[str]] = {}
            for term in self._terms:
                labels.setdefault(_normalise(self._names[term]), set()).add(term)
                for text, scope in self._synonyms.get(term, ()):
                    key = _normalise(text)
                    anysyn.setdefault(key, set()).add(term)
                    if scope == "EXACT":
                        exact.setdefault(key, set()).add(term)
            self._name_index = (labels, exact, anysyn)
        return self._name_index

    def resolve(self, value: str) -> str | None:
        """Map one label to a live CL term ID, or None when it cannot be mapped unambiguously.

        Accepted, in this order: a live ID (also written ``CL_0000084`` or as a PURL); an alternative ID (-> its
        primary term); an obsolete ID with a live CL replacement (``replaced_by``, or a ``consider`` list that
        leads to exactly one live term; logged once as a warning); a name, compared case-insensitively with
        whitespace collapsed, first against live term names, then EXACT synonyms, then synonyms of any scope, then
        names of obsolete terms (-> their replacement), then names the term had in earlier CL releases (the releases
        shipped with cellxgene-ontology-guide, and :data:`schce._cl_history.FORMER_NAMES`), e.g. scTab's
        "lamp5 GABAergic cortical interneuron" -> CL:4023011. The last two are logged once as warnings. A name that
        leads to several live terms in the first tier where it matches is ambiguous and gives None (the error of
        :meth:`map_labels` lists the candidates).

        Parameters
        ----------
        value
            A CL ID, name or synonym.

        Returns
        -------
        str or None
            The live term ID.

        """
        if not isinstance(value, str):
            return None
        text = value.strip()
        if not text:
            return None
        match = _ID_RE.match(text)
        if match:
            return self._resolve_id(f"CL:{match.group(1)}")
        found = self._name_candidates(text)
        if found is None:
            return None
        tier, hits = found
        if len(hits) != 1:
            logger.debug("%r is ambiguous: %s of %s", value, tier, hits)
            return None
        if tier in ("obsolete name", "former name") and (text, hits[0]) not in self._warned:
            self._warned.add((text, hits[0]))
            logger.warning(
                "%r is not a current Cell Ontology name; as %s it was mapped to %s (%s).",
                text,
                "the name of an obsolete term" if tier == "obsolete name" else "a name in an earlier CL release",
                hits[0],
                self._names[hits[0]],
            )
        return hits[0]

    def _name_candidates(self, text: str) -> tuple[str, list[str]] | None:
        """The first tier in which a name matches, with the live terms it leads to there (several = ambiguous).

        Tiers: live names, EXACT synonyms, any synonyms (this release); names of obsolete terms (-> replacement);
        former names, i.e. labels and synonyms in earlier CL releases (:mod:`schce._cl_history`), followed by ID.
        """
        key = _normalise(text)
        for tier, index in zip(("name", "EXACT synonym", "synonym"), self._names_by_tier(), strict=True):
            if index.get(key):
                return tier, sorted(index[key])
        obsolete = [
            t
            for t in self._obsolete
            if self._names.get(t) and _normalise(self._names[t].removeprefix("obsolete ")) == key
        ]
        if obsolete:
            return "obsolete name", self._live_targets(obsolete)
        from schce._cl_history import former_name_index

        former = former_name_index().get(key)
        if former:
            return "former name", self._live_targets(former)
        return None

    def _live_targets(self, term_ids: Iterable[str]) -> list[str]:
        """Live terms the IDs lead to; an obsolete term with several ``consider`` candidates adds all of them."""
        out: set[str] = set()
        for term in term_ids:
            live = self._follow(term)
            out.update([live] if live is not None else self._consider_options(term))
        return sorted(out)

    def _close_matches(self, value: str) -> list[str]:
        if self._close_names is None:
            close: dict[str, str] = {}
            for term in self._terms:
                close.setdefault(self._names[term].lower(), term)
            self._close_names = close
        query = value.lower()
        match = _ID_RE.match(value.strip())
        if match and self._names.get(f"CL:{match.group(1)}"):
            # For an obsolete ID the old name says best what was meant.
            query = self._names[f"CL:{match.group(1)}"].lower().removeprefix("obsolete ")
        found = difflib.get_close_matches(query, list(self._close_names), n=3, cutoff=0.6)
        return [f"{self._names[self._close_names[name]]!r} ({self._close_names[name]})" for name in found]

    def _listing(self, terms: Iterable[str]) -> str:
        return ", ".join(f"{self._names[t]!r} ({t})" for t in terms)

    def _describe_unmapped(self, value: str) -> str:
        match = _ID_RE.match(value.strip())
        note = ""
        if match:
            term = f"CL:{match.group(1)}"
            options = self._consider_options(term) if term in self._obsolete else []
            if len(options) > 1:
                return (
                    f"  - {value!r} (obsolete; CL says to consider several terms): candidates {self._listing(options)}"
                )
            if term in self._obsolete:
                note = " (obsolete, with no live CL replacement)"
            elif term not in self._names:
                note = f" (no such ID in CL {self._version})"
        else:
            found = self._name_candidates(value.strip())
            if found is not None and len(found[1]) > 1:
                return f"  - {value!r} (ambiguous {found[0]}): candidates {self._listing(found[1])}"
        close = self._close_matches(value)
        suggestion = "close CL names: " + ", ".join(close) if close else "no close CL names"
        return f"  - {value!r}{note}: {suggestion}"

    def map_labels(self, values: Iterable[Any]) -> dict[str, str]:
        """Map each distinct non-null label to a live CL term ID with :meth:`resolve`.

        Parameters
        ----------
        values
            Labels (e.g. an ``obs`` column); None / NaN are skipped.

        Returns
        -------
        dict
            Label -> live term ID, in order of first appearance.

        Raises
        ------
        LabelMappingError
            If any label cannot be mapped; the message lists all of them with close CL names and how to fix it, and
            ``.unmapped`` holds them.
        TypeError
            If a non-null label is not a string.

        """
        mapping: dict[str, str] = {}
        unmapped: list[str] = []
        for value in dict.fromkeys(values):
            if _is_null(value):
                continue
            if not isinstance(value, str):
                raise TypeError(f"Cell-type labels must be strings, got {value!r} ({type(value).__name__}).")
            term = self.resolve(value)
            if term is None:
                unmapped.append(value)
            else:
                mapping[value] = term
        if unmapped:
            unmapped.sort()
            total = len(mapping) + len(unmapped)
            lines = [
                f"{len(unmapped)} of {total} cell-type labels could not be mapped to live Cell Ontology terms "
                f"(CL {self._version}, {self._source or 'unknown source'}):",
                *(self._describe_unmapped(value) for value in unmapped),
                _FIX_HINT,
            ]
            raise LabelMappingError("\n".join(lines), unmapped)
        return mapping

    # ------------------------------------------------------------------ subsets and serialisation

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


def _parse_synonym(raw: str) -> tuple[str, str] | None:
    """Parse an OBO synonym value such as ``'"T lymphocyte" EXACT []'`` into ``("T lymphocyte", "EXACT")``."""
    match = _SYNONYM_RE.match(raw)
    if match is None:
        return None
    text = re.sub(r"\\(.)", r"\1", match.group(1))
    scope = (match.group(2) or "").upper()
    return text, scope if scope in SYNONYM_SCOPES else ""


def _header_value(header: Mapping[str, Any], key: str) -> str | None:
    value = header.get(key)
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value) if value else None


def _obo_version(header: Mapping[str, Any]) -> str:
    """Release date from the OBO header (``data-version: cl/releases/2026-03-26/...``), else what the header has."""
    data_version = _header_value(header, "data-version")
    if data_version:
        match = _DATE_RE.search(data_version)
        return match.group(0) if match else data_version
    return _header_value(header, "date") or "unknown"


def _load_obo(source: str, display: str) -> CellOntology:
    import obonet  # imported here: only needed for OBO files and pulls in networkx

    start = time.perf_counter()
    try:
        graph = obonet.read_obo(source, ignore_obsolete=False)
    except OSError:
        raise
    except Exception as exc:
        raise ValueError(
            f"{display} is not a readable OBO file ({type(exc).__name__}: {exc}); expected the Cell Ontology in OBO "
            "format, such as cl-simple.obo or cl-basic.obo."
        ) from exc

    names: dict[str, str] = {}
    obsolete: dict[str, str | None] = {}
    synonyms: dict[str, list[tuple[str, str]]] = {}
    alt_primary: dict[str, str] = {}
    consider: dict[str, list[str]] = {}
    for node, data in graph.nodes(data=True):
        # Nodes without data are edge targets that have no stanza in this file (e.g. outside a subset).
        if not node.startswith("CL:") or not data:
            continue
        names[node] = str(data.get("name") or node)
        if str(data.get("is_obsolete", "false")).lower() == "true":
            # Non-CL replacements (CLO, PO, GO, ...) cannot stand in for a cell type.
            obsolete[node] = next((r for r in data.get("replaced_by", []) if r.startswith("CL:")), None)
            if obsolete[node] is None and data.get("consider"):
                consider[node] = list(data["consider"])
        parsed = [_parse_synonym(raw) for raw in data.get("synonym", [])]
        if any(parsed):
            synonyms[node] = [pair for pair in parsed if pair is not None]
        for alt in data.get("alt_id", []):
            alt_primary[alt] = node
    if not names:
        raise ValueError(
            f"{display} contains no Cell Ontology terms; expected an OBO file with [Term] stanzas whose IDs start "
            "with 'CL:' (such as cl-simple.obo)."
        )

    live = names.keys() - obsolete.keys()
    parents: dict[str, list[str]] = {}
    dropped = 0
    for child, parent, relation in graph.edges(keys=True):
        if relation != "is_a" or not child.startswith("CL:") or not parent.startswith("CL:"):
            continue
        if child in live and parent in live:
            parents.setdefault(child, []).append(parent)
        else:
            dropped += 1
    if dropped:
        logger.warning(
            "%s: ignored %d is_a edges to or from obsolete CL terms or terms without a stanza", display, dropped
        )
    alt_ids = {alt: primary for alt, primary in alt_primary.items() if alt not in names}

    try:
        ontology = CellOntology(
            names,
            parents,
            synonyms=synonyms,
            obsolete=obsolete,
            alt_ids=alt_ids,
            consider=consider,
            version=_obo_version(graph.graph),
            source=display,
        )
    except ValueError as exc:
        raise ValueError(f"{display}: {exc}") from exc
    logger.info(
        "Loaded Cell Ontology %s from %s: %d live terms, %d obsolete, in %.2f s",
        ontology.version,
        display,
        len(ontology),
        len(obsolete),
        time.perf_counter() - start,
    )
    return ontology


@functools.lru_cache(maxsize=1)
def _load_embedded() -> CellOntology:
    from cellxgene_ontology_guide.supported_versions import CXGSchema

    start = time.perf_counter()
    schema = CXGSchema()
    raw_version = schema.supported_ontologies["CL"]["version"]
    data = schema.ontology("CL")
    try:
        guide_version = _package_version("cellxgene-ontology-guide")
    except PackageNotFoundError:  # pragma: no cover - only for unusual installs
        guide_version = "unknown"

    names: dict[str, str] = {}
    obsolete: dict[str, str | None] = {}
    alt_ids: dict[str, str] = {}
    consider: dict[str, list[str]] = {}
    synonyms: dict[str, list[tuple[str, str]]] = {}
    for term, info in data.items():
        repl = info.get("replaced_by")
        cl_repl = repl if isinstance(repl, str) and repl.startswith("CL:") else None
        if info.get("deprecated"):
            # The guide lists alternative IDs as deprecated entries without a label that point to the primary term.
            if not info.get("label") and cl_repl in data:
                alt_ids[term] = cl_repl
                continue
            obsolete[term] = cl_repl
            if cl_repl is None and info.get("consider"):
                consider[term] = list(info["consider"])
        names[term] = info.get("label") or term
        if info.get("synonyms"):
            # The guide keeps exactly the EXACT synonyms of the OBO release (checked for all live terms of 2026-03-26).
            synonyms[term] = [(text, "EXACT") for text in info["synonyms"]]

    live = names.keys() - obsolete.keys()
    ancestor_sets = {term: frozenset(a for a in data[term]["ancestors"] if a in live) for term in live}
    parents: dict[str, tuple[str, ...]] = {}
    linked = 0
    for term in live:
        direct = {a for a, dist in data[term]["ancestors"].items() if dist == 1 and a in live}
        covered = set(direct)
        for parent in direct:
            covered |= ancestor_sets[parent]
        missing = ancestor_sets[term] - covered
        if missing:
            # The guide's ancestors also run through part_of and non-CL classes, so some are not reachable through
            # the distance-1 ones; link the most specific of them directly to keep the guide's closure.
            direct |= {a for a in missing if not any(a in ancestor_sets[b] for b in missing if b != a)}
            linked += 1
        parents[term] = tuple(sorted(direct))
    logger.debug("Embedded CL: %d terms needed direct links to ancestors beyond distance 1", linked)

    ontology = CellOntology(
        names,
        parents,
        synonyms=synonyms,
        obsolete=obsolete,
        alt_ids=alt_ids,
        consider=consider,
        version=raw_version.removeprefix("v"),
        source=f"cellxgene-ontology-guide {guide_version} (CL {raw_version})",
    )
    logger.info(
        "Loaded embedded Cell Ontology %s: %d live terms, in %.2f s",
        ontology.version,
        len(ontology),
        time.perf_counter() - start,
    )
    return ontology


def load_cell_ontology(source: str | os.PathLike[str] | CellOntology | None = None) -> CellOntology:
    """Load the Cell Ontology (CL).

    Parameters
    ----------
    source
        ``None`` (default): the CL release embedded in ``cellxgene-ontology-guide`` (offline; loaded once and cached),
        i.e. the release that CELLxGENE Census labels use. A path or an ``http(s)``/``ftp`` URL of a CL file in OBO
        format (e.g. ``cl-simple.obo``, optionally compressed): read with ``obonet``, keeping only ``CL:`` terms and
        the ``is_a`` edges between live CL terms; obsolete terms map to their first CL ``replaced_by`` (or None),
        alternative IDs to their primary term, and terms without an ``is_a`` parent stay roots. A
        :class:`CellOntology` is returned as is.

    Returns
    -------
    CellOntology
        The ontology; ``version`` is the release date (e.g. ``"2026-03-26"``) when known.

    Raises
    ------
    FileNotFoundError
        If the path does not exist.
    ValueError
        If the file is not OBO or has no CL terms, or if its ``is_a`` graph has a cycle (the message names it).

    Notes
    -----
    The two sources agree closely but not exactly. For release 2026-03-26 the embedded data has the same ancestors
    as the ``is_a`` closure of ``cl-simple.obo`` for all 3,324 live terms except 18, where it has extra ancestors,
    because its closure is taken over the full OWL file rather than ``is_a`` alone:

    - ``is_a`` orphans (the CL:00175xx cytoplasm and nucleus terms, whose superclasses lie outside CL) get
      ``CL:0000000``;
    - some terms get ancestors through ``part_of`` (BFO:0000050): CL:0002453 is part of CL:0000125, CL:4052024 and
      CL:4052025 are part of CL:0008046, and their descendants inherit these.

    For the embedded data, direct parents are the ancestors at distance 1; ancestors that those do not reach (the
    cases above) are linked directly, so that :meth:`CellOntology.ancestors` equals the embedded closure. The
    embedded data has only the EXACT synonyms and lists alternative IDs as deprecated entries without a label (read
    here as alternative IDs).

    """
    if source is None:
        return _load_embedded()
    if isinstance(source, CellOntology):
        return source
    if isinstance(source, str) and source.strip().lower().startswith(_URL_PREFIXES):
        return _load_obo(source.strip(), display=source.strip())
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"source must be None, a path, a URL or a CellOntology, not {type(source).__name__}.")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Cell Ontology OBO file not found: '{path}' (pass an existing CL OBO file, a URL, or None for the CL "
            "release embedded in cellxgene-ontology-guide)."
        )
    return _load_obo(str(path), display=str(path))
