"""Reading the Cell Ontology: the release embedded in cellxgene-ontology-guide, or any OBO file (path or URL)."""

import functools
import logging
import os
import re
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any

from schce.ontology._base import (
    _DATE_RE,
    _SYNONYM_RE,
    _URL_PREFIXES,
    SYNONYM_SCOPES,
)
from schce.ontology._core import CellOntology

logger = logging.getLogger(__name__)


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
