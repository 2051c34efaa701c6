"""Aligning a query's genes to the model's genes."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
LOW_OVERLAP = 0.5


def strip_ensembl_version(names: Sequence[str]) -> np.ndarray:
    """Drop version suffixes from Ensembl IDs (``ENSG00000141510.17`` → ``ENSG00000141510``); leave others."""
    out = np.asarray([str(n) for n in names], dtype=object)
    for i, n in enumerate(out):
        if _ENSEMBL.match(n) and "." in n:
            out[i] = n.split(".", 1)[0]
    return out


def _duplicates(stripped: np.ndarray, original: Sequence[str]) -> dict[str, list[str]]:
    """Every name that occurs more than once after stripping, with the original names behind it."""
    groups: dict[str, list[str]] = {}
    for key, name in zip(stripped, original, strict=True):
        groups.setdefault(key, []).append(str(name))
    return {k: v for k, v in groups.items() if len(v) > 1}


def model_genes(var_names: Sequence[str], where: str = "adata.var_names") -> list[str]:
    """The model's genes from a training set's ``var_names``: Ensembl versions stripped, each gene once.

    Raises
    ------
    ValueError
        On duplicated names, or Ensembl IDs that collide once their version is stripped, listing them.
    """
    original = [str(n) for n in var_names]
    genes = strip_ensembl_version(original)
    dup = _duplicates(genes, original)
    if dup:
        shown = "; ".join(
            f"{k} ({', '.join(v)})" if len(set(v)) > 1 else f"{k} ×{len(v)}" for k, v in list(dup.items())[:10]
        )
        more = f" and {len(dup) - 10} more" if len(dup) > 10 else ""
        raise ValueError(
            f"{where} has {len(dup)} duplicated gene(s) (Ensembl version suffixes ignored): {shown}{more}. A model "
            "needs each gene once: aggregate or drop the copies (e.g. adata = adata[:, ~adata.var_names.duplicated()]"
            " after stripping versions), or call adata.var_names_make_unique() if they are different genes."
        )
    return [str(g) for g in genes]


def gene_id_type(names: Sequence[str]) -> str:
    """``"Ensembl IDs"`` when most names are Ensembl gene IDs, else ``"gene symbols"``."""
    names = list(names)[:2000]
    if not names:
        return "gene symbols"
    frac = np.mean([bool(_ENSEMBL.match(str(n))) for n in names])
    return "Ensembl IDs" if frac > 0.5 else "gene symbols"


class GeneAligner:
    """Positions of the model's genes in a query.

    Parameters
    ----------
    model_genes
        The model's genes, in input order.
    query_genes
        The query's gene identifiers (``var_names`` or a ``var`` column).
    where
        How the query genes were found, for messages.

    Attributes
    ----------
    index
        For every model gene, its column in the query, or ``-1`` when missing (zero-filled).
    overlap
        Fraction of model genes found.
    """

    def __init__(self, model_genes: Sequence[str], query_genes: Sequence[str], where: str = "var_names"):
        model = strip_ensembl_version(model_genes)
        query = strip_ensembl_version(query_genes)
        first: dict[str, int] = {}
        for i, name in enumerate(query):
            first.setdefault(name, i)  # duplicated query names: the first occurrence wins
        self.index = np.array([first.get(g, -1) for g in model], dtype=np.int64)
        model_set = set(model)
        dup = {k: v for k, v in _duplicates(query, query_genes).items() if k in model_set}
        if dup:
            shown = "; ".join(f"{k}: {', '.join(v)} (column {first[k]} used)" for k, v in list(dup.items())[:10])
            logger.warning(
                "%d model gene(s) occur more than once in the query %s (Ensembl versions ignored); the first copy of "
                "each is used: %s%s.",
                len(dup),
                where,
                shown,
                f" and {len(dup) - 10} more" if len(dup) > 10 else "",
            )
        self.n_found = int((self.index >= 0).sum())
        self.n_model = len(model)
        self.overlap = self.n_found / max(self.n_model, 1)
        if self.n_found == 0:
            raise ValueError(
                f"No gene overlap between the query ({where}: {gene_id_type(query)}, e.g. {list(query[:3])}) and "
                f"the model ({gene_id_type(model)}, e.g. {list(model[:3])}). Pass gene_symbols= naming the var "
                "column that holds the model's identifier type."
            )
        self.identity = self.n_found == self.n_model == len(query) and np.array_equal(self.index, np.arange(len(query)))
        msg = "Gene overlap: %d of %d model genes found in the query %s (%.1f%%); missing genes are zero-filled."
        args = (self.n_found, self.n_model, where, 100 * self.overlap)
        if self.overlap < LOW_OVERLAP:
            logger.warning(msg + " Predictions may be unreliable below 50%%.", *args)
        else:
            logger.info(msg, *args)

    def transform(self, block: np.ndarray) -> np.ndarray:
        """Reorder ``(n_cells, n_query_genes)`` dense rows to ``(n_cells, n_model_genes)``, zeros where missing."""
        if self.identity:
            return block
        out = np.zeros((block.shape[0], self.n_model), dtype=np.float32)
        found = self.index >= 0
        out[:, found] = block[:, self.index[found]]
        return out

    def query_columns(self) -> np.ndarray:
        """The query columns that hold model genes."""
        return self.index[self.index >= 0]

    def summary(self) -> dict:
        """JSON-able overlap record (stored in ``uns``)."""
        return {"n_model_genes": self.n_model, "n_found": self.n_found, "fraction": round(self.overlap, 6)}
