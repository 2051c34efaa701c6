"""Former Cell Ontology names: labels that CL terms carried in earlier releases.

Published models and stores (scTab, the HCE paper) name their labels as CL named them in 2023. CL has since renamed
some terms (e.g. "lamp5 GABAergic cortical interneuron" is now "lamp5 GABAergic interneuron", same ID CL:4023011),
so those names are no longer live names or synonyms. The IDs are stable, so an old name is resolved through the
release that still used it: the earlier CL releases that ``cellxgene-ontology-guide`` ships with the current one
(offline), and, for names older than all of those, the short table below.
"""

from __future__ import annotations

import functools
import json
import logging
import re

logger = logging.getLogger(__name__)

# Former CL labels that no release shipped with cellxgene-ontology-guide (2025-02-13 onwards) still carries.
# Source: the CL term label in the releases used by CELLxGENE census 2023-05-15 (scTab's store lists it,
# theislab/scTab notebooks/data_augmentation/shortend_cell_types.yaml); CL later dropped "cortical" from it.
FORMER_NAMES: dict[str, tuple[str, str]] = {
    "L2/3-6 intratelencephalic projecting glutamatergic cortical neuron": ("CL:4023040", "CL label before 2025"),
}

_RELEASE_RE = re.compile(r"^CL-ontology-v?(\d{4}-\d{2}-\d{2})\.json\.zst$")


def normalise(text: str) -> str:
    """Case-insensitive, whitespace-collapsed key (the same rule as :meth:`CellOntology.resolve`)."""
    return " ".join(str(text).split()).casefold()


def _embedded_releases() -> list[tuple[str, object]]:
    """``(release, path)`` of every CL release file shipped with cellxgene-ontology-guide, newest first."""
    try:
        from importlib.resources import files

        data = files("cellxgene_ontology_guide").joinpath("data")
        found = [(m.group(1), p) for p in data.iterdir() if (m := _RELEASE_RE.match(p.name))]
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):  # pragma: no cover - unusual installs
        return []
    return sorted(found, key=lambda item: item[0], reverse=True)


@functools.lru_cache(maxsize=1)
def former_name_index() -> dict[str, dict[str, list[str]]]:
    """Normalised former name -> {CL ID: [where that name was used]}.

    Collected from the labels and (EXACT) synonyms of every CL release shipped with cellxgene-ontology-guide, plus
    :data:`FORMER_NAMES`. Loaded on first use (about a second), only when a name is not found in the current release.
    """
    import zstandard

    index: dict[str, dict[str, list[str]]] = {}

    def add(name: str, term: str, where: str) -> None:
        index.setdefault(normalise(name), {}).setdefault(term, []).append(where)

    for release, path in _embedded_releases():
        with path.open("rb") as fh:
            terms = json.loads(zstandard.ZstdDecompressor().stream_reader(fh).read())
        for term, info in terms.items():
            if not term.startswith("CL:") or not info.get("label"):
                continue
            label = str(info["label"])
            if info.get("deprecated"):
                label = label.removeprefix("obsolete ")
            add(label, term, f"CL {release} label")
            for synonym in info.get("synonyms") or ():
                add(synonym, term, f"CL {release} synonym")
    for name, (term, where) in FORMER_NAMES.items():
        add(name, term, where)
    logger.debug("Former CL names: %d keys from %d embedded releases", len(index), len(_embedded_releases()))
    return index
