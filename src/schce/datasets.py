"""Bundled demo data and a synthetic atlas."""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from schce._simulate import simulate_atlas

logger = logging.getLogger(__name__)

# scanpy's pbmc68k_reduced `bulk_labels` (sorted-bulk correlation labels) as Cell Ontology terms.
PBMC68K_LABELS_TO_CL = {
    "CD14+ Monocyte": "CL:0001054",  # CD14-positive monocyte
    "Dendritic": "CL:0000451",  # dendritic cell
    "CD56+ NK": "CL:0000623",  # natural killer cell
    "CD4+/CD25 T Reg": "CL:0000815",  # regulatory T cell
    "CD19+ B": "CL:0000236",  # B cell
    "CD8+ Cytotoxic T": "CL:0000625",  # CD8-positive, alpha-beta T cell
    "CD4+/CD45RO+ Memory": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8-positive, alpha-beta T cell
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",  # naive thymus-derived CD4-positive, alpha-beta T cell
    "CD34+": "CL:0008001",  # hematopoietic precursor cell
}


def pbmc68k() -> AnnData:
    """700 PBMCs × 765 genes with integer counts and Cell Ontology labels, from scanpy's ``pbmc68k_reduced``.

    Counts are recovered from the bundled log-normalised ``raw`` as ``round(expm1(raw.X) * n_counts / 1e4)``.
    Needs no download.

    Returns
    -------
    AnnData with counts in ``X`` (CSR), ``obs["cell_type_ontology_term_id"]`` (CL IDs), ``obs["cell_type"]``
    (CL names) and the original ``obs["bulk_labels"]``.
    """
    import scanpy as sc

    from schce.ontology import load_cell_ontology

    src = sc.datasets.pbmc68k_reduced()
    raw = src.raw.to_adata()
    lognorm = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    n_counts = src.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.round(np.expm1(lognorm.astype(np.float64)) * n_counts / 1e4).astype(np.float32)
    adata = AnnData(X=sp.csr_matrix(counts), obs=src.obs[["bulk_labels", "n_counts", "phase"]].copy(), var=raw.var[[]])
    ids = adata.obs["bulk_labels"].astype(str).map(PBMC68K_LABELS_TO_CL)
    onto = load_cell_ontology()
    adata.obs["cell_type_ontology_term_id"] = ids.astype("category")
    adata.obs["cell_type"] = ids.map(onto.name).astype("category")
    return adata


__all__ = ["pbmc68k", "simulate_atlas"]
