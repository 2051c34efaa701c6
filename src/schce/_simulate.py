"""A synthetic single-cell atlas over a real Cell Ontology subtree (for tests and loader benchmarks)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SCTAB_N_GENES = 19331
# The 10x assays scTab keeps, and the census-style metadata values the simulated datasets draw from.
_ASSAYS = ("10x 3' v2", "10x 3' v3", "10x 5' v1", "10x 5' v2")
_TISSUES = (("blood", "blood"), ("bone marrow", "bone marrow"), ("spleen", "spleen"), ("lung", "lung"))
_DISEASES = ("normal", "normal", "normal", "COVID-19", "systemic lupus erythematosus")
_STAGES = ("22-year-old human stage", "45-year-old human stage", "63-year-old human stage", "80 year-old and over")


def _pick_types(onto, root: str, n_types: int, rng: np.random.Generator) -> list[str]:
    """``n_types`` descendants of ``root`` chosen so that several of them nest (mixed depths)."""
    # Leave out the invertebrate terms CL also holds ("... (sensu Arthropoda)").
    pool = sorted(
        t
        for t in onto.descendants(root)
        if not any("sensu" in onto.name(a) for a in onto.ancestors(t, include_self=True))
    )
    if len(pool) < n_types:
        raise ValueError(f"{root} has {len(pool)} descendants; ask for at most that many cell types (n_cell_types).")
    chosen: list[str] = []
    for term in rng.permutation(pool):
        if len(chosen) >= n_types:
            break
        # Prefer terms whose ancestors below the root are few, so the label set stays a recognisable tree.
        depth = len(onto.ancestors(term) & onto.descendants(root))
        if depth <= 3 and term not in chosen:
            chosen.append(str(term))
    for term in rng.permutation(pool):  # top up if the shallow terms ran out
        if len(chosen) >= n_types:
            break
        if term not in chosen:
            chosen.append(str(term))
    return chosen


def simulate_atlas(
    n_cells: int = 10_000,
    n_genes: int = SCTAB_N_GENES,
    n_cell_types: int = 20,
    n_datasets: int = 8,
    n_donors: int = 32,
    root: str = "CL:0000738",
    coarse_fraction: float = 0.25,
    library_size: float = 2500.0,
    batch_effect: float = 0.3,
    seed: int = 0,
    chunk_size: int = 2048,
    progress: bool = True,
    cell_types: Sequence[str] | None = None,
) -> AnnData:
    """Simulate raw counts of an atlas: many datasets and donors, cell types from a real Cell Ontology subtree.

    Each cell type's expression profile follows the ontology: a child's log-mean profile is its parents' average
    plus a perturbation of a few percent of the genes, so related types are similar. Every dataset has a gene-wise
    batch effect and its own library size, every donor a smaller gene-wise effect, and a dataset holds a random
    subset of the types. A ``coarse_fraction`` of the datasets is annotated only coarsely: their cells carry a
    parent term of their true type (mixed granularity, as in CELLxGENE). Counts are Poisson given the means, with
    about 10% non-zeros at the default 19,331 genes and library size. Cells come grouped by dataset and donor, as
    in real atlas stores. Generated chunk by chunk into a CSR matrix (200,000 cells take about a minute).

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes (scTab's 19,331 by default).
    n_cell_types
        Number of fine cell types, drawn from the descendants of ``root`` with the seed.
    n_datasets, n_donors
        Number of datasets and donors (each donor belongs to one dataset).
    root
        CL term whose subtree the types come from; default ``leukocyte``.
    coarse_fraction
        Fraction of datasets annotated only with the parents of the true types.
    library_size
        Typical counts per cell.
    batch_effect
        Standard deviation of the dataset effect on log means (donors get a third of it).
    seed
        Random seed: the same arguments give the same atlas.
    chunk_size
        Cells generated at a time (bounds the temporary memory: about ``chunk_size × n_genes × 16`` bytes).
    progress
        Show a progress bar for large atlases.
    cell_types
        The true cell types (CL IDs under ``root``), instead of ``n_cell_types`` drawn at random. A type may be an
        ancestor of another (e.g. "T cell" beside "CD4-positive, alpha-beta T cell"): cells of the parent type are
        the ones no finer type describes.

    Returns
    -------
    AnnData with counts in ``X`` (float32 CSR), census-style ``obs`` (``cell_type``,
    ``cell_type_ontology_term_id``, ``true_cell_type_ontology_term_id``, ``dataset_id``, ``donor_id``,
    ``tech_sample``, ``assay``, ``tissue``, ``tissue_general``, ``disease``, ``development_stage``, ``sex``,
    ``is_primary_data``, ``soma_joinid``) and ``var`` indexed by Ensembl-like ``feature_id`` with
    ``feature_name``.
    """
    from schce.ontology import load_cell_ontology

    _check_sizes(n_cells, n_genes, n_datasets, n_donors, n_cell_types, coarse_fraction)
    onto = load_cell_ontology()
    if root not in onto:
        raise ValueError(f"root={root!r} is not a live term of the embedded Cell Ontology {onto.version}.")
    rng = np.random.default_rng(seed)  # one generator drawn from in a fixed order: the same seed, the same atlas
    subtree = onto.descendants(root, include_self=True)
    types = _cell_types(onto, root, subtree, n_cell_types, cell_types, rng)
    type_means, coarse_of = _type_profiles(onto, types, subtree, n_genes, rng)
    ds = _datasets(rng, n_datasets, n_donors, n_genes, len(types), batch_effect, library_size, coarse_fraction)

    # Per-cell attributes, grouped by donor (hence by dataset).
    donor = np.sort(rng.integers(0, n_donors, n_cells))
    dataset = ds["donor_dataset"][donor]
    cum = ds["type_mix"].cumsum(1)
    cell_type = (rng.random(n_cells)[:, None] > cum[dataset]).sum(1).clip(0, len(types) - 1)
    lib = ds["library"][dataset] * np.exp(rng.normal(0.0, 0.4, n_cells))
    # Dataset and donor effects combined per donor: one gather per chunk instead of two.
    donor_scale = ds["effect"][ds["donor_dataset"]] * ds["donor_effect"]
    X = _counts(type_means, cell_type, donor_scale, donor, lib, rng, chunk_size, progress)

    true_ids = np.array(types)[cell_type]
    labels = np.where(ds["coarse"][dataset], coarse_of[cell_type], true_ids)
    feature_id = [f"ENSG{i + 100000:011d}" for i in range(n_genes)]
    var = pd.DataFrame({"feature_name": [f"SIM{i:05d}" for i in range(n_genes)]}, index=pd.Index(feature_id))
    var["feature_id"] = var.index.to_numpy()
    var.index.name = None
    adata = AnnData(X=X, obs=_obs(onto, labels, true_ids, ds, dataset, donor, rng), var=var)
    adata.uns["simulation"] = {
        "root": root,
        "cell_types": types,
        "seed": seed,
        "coarse_datasets": list(ds["ids"][ds["coarse"]]),
    }
    logger.info(
        "Simulated %d cells × %d genes, %d types under %s, %.1f%% non-zeros.",
        n_cells,
        n_genes,
        len(types),
        onto.name(root),
        100 * X.nnz / max(1, n_cells * n_genes),
    )
    return adata


def _check_sizes(n_cells, n_genes, n_datasets, n_donors, n_cell_types, coarse_fraction) -> None:
    for name, value in (("n_cells", n_cells), ("n_genes", n_genes), ("n_datasets", n_datasets)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")
    if n_donors < n_datasets:
        raise ValueError(f"n_donors ({n_donors}) must be at least n_datasets ({n_datasets}): each dataset has donors.")
    if n_cell_types < 2:
        raise ValueError(f"n_cell_types must be at least 2, got {n_cell_types}.")
    if not 0 <= coarse_fraction < 1:
        raise ValueError(f"coarse_fraction must be in [0, 1), got {coarse_fraction}.")


def _cell_types(onto, root: str, subtree, n_cell_types: int, cell_types, rng: np.random.Generator) -> list[str]:
    """The true cell types: the user's (checked to lie under ``root``), else ``n_cell_types`` drawn."""
    if cell_types is None:
        return _pick_types(onto, root, n_cell_types, rng)
    types = list(dict.fromkeys(cell_types))
    outside = [t for t in types if t not in subtree]
    if len(types) < 2 or outside:
        raise ValueError(
            f"cell_types must be at least two CL terms under root={root!r}; got {len(types)}, not under it: {outside}."
        )
    return types


def _type_profiles(onto, types: list[str], subtree, n_genes: int, rng: np.random.Generator):
    """Each type's expression proportions (types × genes), and the coarse annotation of each type."""
    # Log-mean profiles, parents before children (a term has more ancestors than any of its ancestors).
    terms = set(types)
    for t in types:
        terms |= onto.ancestors(t) & subtree
    order = sorted(terms, key=lambda t: (len(onto.ancestors(t)), t))
    base = np.log(rng.gamma(0.3, 1.0, n_genes) + 1e-4)
    profile: dict[str, np.ndarray] = {}
    for t in order:
        parents = [profile[p] for p in onto.parents(t) if p in profile]
        mean = np.mean(parents, axis=0) if parents else base
        delta = np.zeros(n_genes)
        hit = rng.random(n_genes) < 0.03
        delta[hit] = rng.normal(0.0, 1.5, hit.sum())
        profile[t] = mean + delta
    type_means = np.stack([profile[t] for t in types])
    type_means = np.exp(type_means - type_means.max(1, keepdims=True))
    type_means = (type_means / type_means.sum(1, keepdims=True)).astype(np.float32)  # (types, genes) proportions
    # A coarse annotation is the type's first parent inside the subtree (the root itself for its children).
    coarse_of = np.array([min([p for p in onto.parents(t) if p in subtree] or [t]) for t in types])
    return type_means, coarse_of


def _datasets(rng, n_datasets, n_donors, n_genes, n_types, batch_effect, library_size, coarse_fraction) -> dict:
    """Datasets (ids, gene effects, library sizes, coarse annotation, type mix, metadata) and their donors."""
    ids = np.array([f"{rng.integers(16**8):08x}-{rng.integers(16**4):04x}-sim-{i:03d}" for i in range(n_datasets)])
    effect = np.exp(rng.normal(0.0, batch_effect, (n_datasets, n_genes))).astype(np.float32)
    library = library_size * np.exp(rng.normal(0.0, 0.3, n_datasets))
    coarse = np.zeros(n_datasets, bool)
    coarse[rng.choice(n_datasets, int(round(coarse_fraction * n_datasets)), replace=False)] = True
    donor_dataset = np.concatenate([np.arange(n_datasets), rng.integers(0, n_datasets, n_donors - n_datasets)])
    donor_dataset.sort()
    donor_effect = np.exp(rng.normal(0.0, batch_effect / 3, (n_donors, n_genes))).astype(np.float32)
    type_mix = np.zeros((n_datasets, n_types))
    for d in range(n_datasets):
        present = rng.random(n_types) < 0.6
        present[rng.integers(n_types)] = True
        type_mix[d, present] = rng.dirichlet(np.full(present.sum(), 1.0))
    return {  # drawn in this order after the type mix, as the atlas always was
        "ids": ids,
        "effect": effect,
        "library": library,
        "coarse": coarse,
        "donor_dataset": donor_dataset,
        "donor_effect": donor_effect,
        "type_mix": type_mix,
        "assay": np.array(_ASSAYS)[rng.integers(0, len(_ASSAYS), n_datasets)],
        "tissue_idx": rng.integers(0, len(_TISSUES), n_datasets),
        "disease": np.array(_DISEASES)[rng.integers(0, len(_DISEASES), n_datasets)],
    }


def _counts(type_means, cell_type, donor_scale, donor, lib, rng, chunk_size: int, progress: bool) -> sp.csr_matrix:
    """Every cell's counts given its type, donor and library size, generated chunk by chunk into a CSR matrix."""
    n_cells, n_genes = len(cell_type), type_means.shape[1]
    indptr = [np.zeros(1, np.int64)]
    indices, data = [], []
    starts = range(0, n_cells, chunk_size)
    nnz = 0
    for start in tqdm(starts, desc="Simulating", unit="chunk", disable=not progress or len(starts) < 10):
        stop = min(start + chunk_size, n_cells)
        m = type_means[cell_type[start:stop]]
        m *= donor_scale[donor[start:stop]]
        m *= (lib[start:stop] / m.sum(1, dtype=np.float64)).astype(np.float32)[:, None]
        # A gene is detected with probability 1 - exp(-mu) (mu > Exp(1)); detected counts are 1 + Poisson(mu),
        # which matches the zero-truncated Poisson for the small means that make up nearly all entries.
        flat = np.flatnonzero(m > rng.standard_exponential(m.shape, dtype=np.float32))
        row, col = np.divmod(flat, n_genes)
        data.append((1 + rng.poisson(m.ravel()[flat])).astype(np.float32))
        indices.append(col.astype(np.int32))
        indptr.append(nnz + np.cumsum(np.bincount(row, minlength=stop - start)))
        nnz += len(flat)
        del m
    return sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n_cells, n_genes)
    )


def _obs(onto, labels, true_ids, ds: dict, dataset, donor, rng: np.random.Generator) -> pd.DataFrame:
    """Census-style cell metadata."""
    n_cells = len(labels)
    names = {t: onto.name(t) for t in set(labels) | set(true_ids)}
    tissue = np.array(_TISSUES)[ds["tissue_idx"][dataset]]
    cat = pd.Categorical
    obs = pd.DataFrame(
        {
            "cell_type": cat([names[t] for t in labels]),
            "cell_type_ontology_term_id": cat(labels),
            "true_cell_type_ontology_term_id": cat(true_ids),
            "dataset_id": cat(ds["ids"][dataset]),
            "donor_id": cat([f"donor_{d:04d}" for d in donor]),
            "assay": cat(ds["assay"][dataset]),
            "tissue": cat(tissue[:, 0]),
            "tissue_general": cat(tissue[:, 1]),
            "disease": cat(ds["disease"][dataset]),
            "development_stage": cat(np.array(_STAGES)[donor % len(_STAGES)]),
            "sex": cat(np.where(donor % 2 == 0, "female", "male")),
            "is_primary_data": rng.random(n_cells) > 0.05,
            "soma_joinid": np.arange(n_cells, dtype=np.int64),
        },
        index=pd.Index([f"cell_{i:07d}" for i in range(n_cells)]),
    )
    obs["tech_sample"] = cat(obs["dataset_id"].astype(str) + "_" + obs["donor_id"].astype(str))
    return obs
