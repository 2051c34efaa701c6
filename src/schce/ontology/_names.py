"""Mapping labels to live CL terms: IDs, names, synonyms, obsolete and renamed terms, close names."""

import difflib
import logging
import re
from collections.abc import Iterable
from typing import Any

from schce.ontology._base import (
    _FIX_HINT,
    _ID_RE,
    LabelMappingError,
    _is_null,
    _normalise,
)

logger = logging.getLogger(__name__)


class _NameResolution:
    """The label-mapping half of :class:`~schce.ontology.CellOntology` (it holds the term tables)."""

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

    def close_terms(self, text: str, n: int = 3) -> list[str]:
        """Live terms whose names are closest to ``text`` (case-insensitive, difflib ratio ≥ 0.6), best first."""
        if self._close_names is None:
            close: dict[str, str] = {}
            for term in self._terms:
                close.setdefault(self._names[term].lower(), term)
            self._close_names = close
        found = difflib.get_close_matches(text.lower(), list(self._close_names), n=n, cutoff=0.6)
        return [self._close_names[name] for name in found]

    def _close_matches(self, value: str) -> list[str]:
        query = value
        match = _ID_RE.match(value.strip())
        if match and self._names.get(f"CL:{match.group(1)}"):
            # For an obsolete ID the old name says best what was meant.
            query = self._names[f"CL:{match.group(1)}"].lower().removeprefix("obsolete ")
        return [f"{self._names[term]!r} ({term})" for term in self.close_terms(query)]

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
