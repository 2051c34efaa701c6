"""Cells from the CZ CELLxGENE Discover Census: out-of-distribution datasets, query AnnData and streaming training.

Needs the ``census`` extra (``pip install 'schce[census]'``: ``cellxgene-census``, ``tiledbsoma``,
``tiledbsoma-ml``). Every function takes an *opened* census, so the same code reads the public release and any local
SOMA store in the census layout::

    import cellxgene_census
    from schce.data import census as sc_census

    with cellxgene_census.open_soma(census_version="2023-12-15") as census:
        adata = sc_census.get_query_anndata(census, model, obs_value_filter="tissue_general == 'lung'")

The census layout read here: a SOMA collection with ``census_data/<organism>`` experiments (measurement ``RNA``,
``X`` layer ``raw`` with integer counts, ``obs`` with ``cell_type_ontology_term_id``, ``assay``,
``is_primary_data``, ``dataset_id`` ..., ``var`` with ``feature_id`` (Ensembl) and ``feature_name`` (symbol)) and
a ``census_info/datasets`` dataframe.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from schce._constants import SCALING_SAMPLE
from schce.data._genes import GeneAligner
from schce.data._loader import EpochLoader
from schce.data._protocol import check_batch_size, check_split

logger = logging.getLogger(__name__)


class HCEClassifier(Protocol):
    """What the census functions read of a :class:`~schce.HCEClassifier`: its genes, labels and set-up.

    Declared here rather than imported, so the data layer never imports the model.
    """

    genes: list[str]
    hierarchy: Any
    registry_: dict
    setup_state: Any


__all__ = ["SCTAB_ASSAYS", "CensusDataModule", "get_query_anndata", "ood_datasets"]

#: The 10x protocols scTab kept when it built its training data from the census (release 2023-05-15).
SCTAB_ASSAYS = (
    "10x 5' v2",
    "10x 3' v3",
    "10x 3' v2",
    "10x 5' v1",
    "10x 3' v1",
    "10x 3' transcription profiling",
    "10x 5' transcription profiling",
)
LABEL_COLUMN = "cell_type_ontology_term_id"
_INSTALL_HINT = "The census functions need the census extra: pip install 'schce[census]'."


def _require_soma():
    """Import tiledbsoma, or explain how to install it."""
    try:
        import tiledbsoma
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return tiledbsoma


def _require_soma_ml():
    """Import tiledbsoma_ml, or explain how to install it."""
    try:
        import tiledbsoma_ml
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return tiledbsoma_ml


def _child(collection, key: str, where: str):
    """``collection[key]`` with an error naming the missing part of the census layout."""
    if key not in collection:
        raise KeyError(
            f"{where} has no {key!r}; found {sorted(collection.keys())}. Pass an opened census "
            "(cellxgene_census.open_soma(census_version=...)) or a SOMA collection in the same layout."
        )
    return collection[key]


# ---------------------------------------------------------------------------------------------------------- datasets
def _datasets(census) -> pd.DataFrame:
    info = _child(census, "census_info", "The census")
    return _child(info, "datasets", "census_info").read().concat().to_pandas()


def ood_datasets(census, reference_census) -> pd.DataFrame:
    """Datasets of one census release that are absent from another: the HCE paper's out-of-distribution protocol.

    A model trained on ``reference_census`` (scTab: release ``2023-05-15``) never saw these datasets, so they
    measure transfer to new studies.

    Parameters
    ----------
    census
        The newer census, opened: ``cellxgene_census.open_soma(census_version="2023-12-15")``.
    reference_census
        The census the model was trained on, opened: ``cellxgene_census.open_soma(census_version="2023-05-15")``.

    Returns
    -------
    The rows of ``census``'s ``census_info/datasets`` whose ``dataset_id`` is not in ``reference_census``, in
    ``census`` order (columns as in the census: ``dataset_id``, ``dataset_title``, ``collection_name``,
    ``dataset_total_cell_count`` ...). Select their cells with
    ``obs_value_filter=f"dataset_id in {ood['dataset_id'].tolist()}"``.
    """
    _require_soma()
    new = _datasets(census)
    old = _datasets(reference_census)
    for name, frame in (("census", new), ("reference_census", old)):
        if "dataset_id" not in frame.columns:
            raise KeyError(f"{name}['census_info']['datasets'] has no 'dataset_id' column: {list(frame.columns)}.")
    out = new[~new["dataset_id"].isin(set(old["dataset_id"]))].reset_index(drop=True)
    logger.info("%d of %d datasets are absent from the reference census.", len(out), len(new))
    return out


# ---------------------------------------------------------------------------------------------------------- queries
def _gene_column(model: HCEClassifier, gene_column: str | None) -> str:
    """The census ``var`` column holding the model's gene identifiers."""
    if gene_column is not None:
        return gene_column
    id_type = model.setup_state.gene_id_type
    return "feature_id" if id_type == "Ensembl IDs" else "feature_name"


def _cell_type_terms(model: HCEClassifier, include_descendants: bool, ontology) -> list[str]:
    """The model's labels and, with ``include_descendants``, every ontology descendant of them."""
    labels = set(model.hierarchy.labels)
    if not include_descendants:
        return sorted(labels)
    from schce.ontology import load_cell_ontology

    onto = load_cell_ontology(ontology if ontology is not None else model.registry_["setup_args"].get("ontology"))
    terms = set(labels)
    for label in labels:
        if label in onto:
            terms |= onto.descendants(label)
    return sorted(terms)


def _value_filter(
    terms: Sequence[str], primary_only: bool, assays: Sequence[str] | None, obs_value_filter: str | None
) -> str:
    """One SOMA value filter: scTab's filters, the cell types and the user's own filter."""
    parts = []
    if primary_only:
        parts.append("is_primary_data == True")
    if assays:
        parts.append(f"assay in {list(assays)}")
    parts.append(f"{LABEL_COLUMN} in {list(terms)}")
    if obs_value_filter:
        parts.append(obs_value_filter)
    return " and ".join(f"({p})" for p in parts)


def _experiment(census, organism: str, measurement_name: str, X_name: str):
    """The organism's experiment, checked to hold the measurement and X layer."""
    data = _child(census, "census_data", "The census")
    exp = _child(data, organism, "census_data")
    ms = _child(exp.ms, measurement_name, f"census_data/{organism}.ms")
    _child(ms.X, X_name, f"census_data/{organism}.ms[{measurement_name!r}].X")
    return exp


def _experiment_of(census, tiledbsoma, organism: str, measurement_name: str, X_name: str):
    """``census`` itself when it is an experiment (checked to hold the layer), else its organism's experiment."""
    if isinstance(census, tiledbsoma.Experiment):
        _child(_child(census.ms, measurement_name, "experiment.ms").X, X_name, f"ms[{measurement_name!r}].X")
        return census
    return _experiment(census, organism, measurement_name, X_name)


class _GeneMap:
    """Census ``var`` rows of the model's genes: their joinids and their positions in the model's input."""

    def __init__(self, exp, measurement_name: str, model: HCEClassifier, gene_column: str | None):
        column = _gene_column(model, gene_column)
        var_df = exp.ms[measurement_name].var
        if column not in var_df.schema.names:
            raise KeyError(
                f"The census var has no column {column!r}; columns: {var_df.schema.names}. Pass gene_column= "
                "naming the column that holds the model's gene identifiers."
            )
        names = [c for c in ("feature_id", "feature_name") if c in var_df.schema.names and c != column]
        var = var_df.read(column_names=["soma_joinid", column, *names]).concat().to_pandas()
        aligner = GeneAligner(model.genes, var[column].astype(str).to_numpy(), where=f"census var[{column!r}]")
        found = aligner.index >= 0
        self.column = column
        self.aligner = aligner
        self.n_model = len(model.genes)
        #: Model input positions of the found genes, and their census var joinids (same order).
        self.positions = np.flatnonzero(found)
        self.joinids = var["soma_joinid"].to_numpy()[aligner.index[found]].astype(np.int64)
        # var frame for the query AnnData: one row per model gene, census names where found.
        self.var = pd.DataFrame(index=pd.Index([str(g) for g in model.genes]))
        for c in (column, *names):
            values = np.full(self.n_model, None, dtype=object)
            values[found] = var[c].astype(str).to_numpy()[aligner.index[found]]
            self.var[c] = values
        self.var["in_census"] = found


def get_query_anndata(
    census,
    model: HCEClassifier,
    obs_value_filter: str | None = None,
    organism: str = "homo_sapiens",
    *,
    include_descendants: bool = True,
    primary_only: bool = True,
    assays: Sequence[str] | None = SCTAB_ASSAYS,
    obs_column_names: Sequence[str] | None = None,
    gene_column: str | None = None,
    measurement_name: str = "RNA",
    X_name: str = "raw",
    ontology=None,
    chunk_size: int = 50_000,
    progress: bool = True,
) -> AnnData:
    """Census cells the model can be scored on, as AnnData of raw counts over the model's genes.

    Applies scTab's filters (primary data only, the 10x assays :data:`SCTAB_ASSAYS`) and keeps cells whose
    ``cell_type_ontology_term_id`` is a model label **or a Cell Ontology descendant of one**: finer labels stay and
    are scored against their nearest model ancestor by :meth:`~schce.HCEClassifier.evaluate` (scTab drops them).

    Parameters
    ----------
    census
        An opened census, e.g. ``cellxgene_census.open_soma(census_version="2023-12-15")``, or
        ``tiledbsoma.open(path)`` for a local store in the census layout.
    model
        A :class:`~schce.HCEClassifier`; its labels select the cells and its genes the columns.
    obs_value_filter
        An extra SOMA value filter on ``obs``, combined with ``and``, e.g. ``"tissue_general == 'lung'"`` or
        ``f"dataset_id in {ids}"`` (from :func:`ood_datasets`).
    organism
        Experiment under ``census_data``: ``"homo_sapiens"`` or ``"mus_musculus"``.
    include_descendants
        Keep cells annotated with a descendant of a model label (``False``: model labels only).
    primary_only
        Keep ``is_primary_data == True`` cells only (each cell once across the census).
    assays
        Assays to keep; ``None`` keeps all.
    obs_column_names
        ``obs`` columns to return; default all.
    gene_column
        ``var`` column matched against the model's genes; default ``feature_id`` for a model on Ensembl IDs, else
        ``feature_name``.
    measurement_name, X_name
        Where the counts are: census ``RNA`` / ``raw``.
    ontology
        Ontology for the descendants; default the model's (the embedded CL release unless set up with a file).
    chunk_size
        Cells per read; bounds the memory of one read.
    progress
        Show a progress bar over the chunks.

    Returns
    -------
    AnnData with ``X`` the raw counts (CSR float32) over ``model.genes`` in model order (missing genes are
    zero columns, ``var["in_census"]`` marks the found ones), ``obs`` the census columns indexed by
    ``soma_joinid``, and ``uns["census_query"]`` recording the filter, organism and gene overlap.
    """
    tiledbsoma = _require_soma()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    exp = _experiment(census, organism, measurement_name, X_name)
    genes = _GeneMap(exp, measurement_name, model, gene_column)
    terms = _cell_type_terms(model, include_descendants, ontology)
    value_filter = _value_filter(terms, primary_only, assays, obs_value_filter)
    columns = None
    if obs_column_names is not None:
        columns = list(dict.fromkeys(["soma_joinid", *obs_column_names]))
    try:
        obs = exp.obs.read(value_filter=value_filter, column_names=columns).concat().to_pandas()
    except (tiledbsoma.SOMAError, ValueError, SyntaxError) as err:
        raise ValueError(f"The census obs query failed for value filter {value_filter!r}: {err}") from err
    if len(obs) == 0:
        raise ValueError(
            f"No census cells match: {value_filter[:500]}. Loosen obs_value_filter, assays or primary_only, or "
            "check that the model's labels occur in this census."
        )
    obs = obs.sort_values("soma_joinid", kind="stable").reset_index(drop=True)
    joinids = obs["soma_joinid"].to_numpy().astype(np.int64)
    X = exp.ms[measurement_name].X[X_name]
    column_of = pd.Index(genes.joinids)
    blocks = []
    starts = range(0, len(joinids), chunk_size)
    for start in tqdm(starts, desc="Reading census", unit="chunk", disable=not progress or len(starts) < 2):
        ids = joinids[start : start + chunk_size]
        table = X.read(coords=(ids, genes.joinids)).tables().concat()
        rows = np.searchsorted(ids, table["soma_dim_0"].to_numpy())
        cols = genes.positions[column_of.get_indexer(table["soma_dim_1"].to_numpy())]
        data = table["soma_data"].to_numpy().astype(np.float32)
        blocks.append(sp.csr_matrix((data, (rows, cols)), shape=(len(ids), genes.n_model), dtype=np.float32))
    matrix = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    matrix.sum_duplicates()
    obs.index = pd.Index(obs["soma_joinid"].astype(str).to_numpy())
    if LABEL_COLUMN in obs.columns:
        finer = int((~obs[LABEL_COLUMN].astype(str).isin(set(model.hierarchy.labels))).sum())
        logger.info("%d census cells selected, %d of them with labels finer than the model's.", len(obs), finer)
    adata = AnnData(X=matrix, obs=obs, var=genes.var.copy())
    adata.uns["census_query"] = {
        "organism": organism,
        "value_filter": value_filter,
        "gene_column": genes.column,
        "gene_overlap": genes.aligner.summary(),
        "measurement_name": measurement_name,
        "X_name": X_name,
    }
    return adata


# ---------------------------------------------------------------------------------------------------------- training
def _cache_soma_ml_kernels() -> None:
    """Let numba cache tiledbsoma-ml's compiled CSR kernels on disk.

    tiledbsoma-ml 0.1.0 compiles them without ``cache=True``: every new process (each DataLoader worker, each epoch,
    since workers are not persistent) would spend seconds to a minute compiling before its first batch.
    """
    try:
        from tiledbsoma_ml import _csr
    except ImportError:  # pragma: no cover - layout of another tiledbsoma-ml version
        return
    for name in ("_csr_merge_inner", "_csr_to_dense_inner", "_coo_to_csr_inner", "_csr_sort_indices"):
        kernel = getattr(_csr, name, None)
        # A numba dispatcher without a cache holds a NullCache; enable_caching() swaps in the on-disk one.
        if hasattr(kernel, "enable_caching") and type(getattr(kernel, "_cache", None)).__name__ == "NullCache":
            kernel.enable_caching()


class _LabelledBatches(IterableDataset):
    """Wraps a ``tiledbsoma_ml.ExperimentDataset``: its ``(X, obs)`` mini-batches become schce training batches."""

    def __init__(self, dataset, positions: np.ndarray, n_model: int, labels: Sequence[str]):
        self.dataset = dataset
        self.training = bool(dataset.shuffle)
        self.positions, self.n_model = positions, n_model
        self.labels = pd.Index(list(labels))
        self.base_seed, self.epoch = int(dataset.seed), 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        _cache_soma_ml_kernels()  # in a worker process this is the first code that runs
        for X, obs in self.dataset:
            if self.training and len(obs) < 2:
                continue  # a last batch of one cell: BatchNorm cannot train on it
            X = np.asarray(X, dtype=np.float32).reshape(len(obs), -1)
            if len(self.positions) == self.n_model and np.array_equal(self.positions, np.arange(self.n_model)):
                x = X
            else:
                x = np.zeros((len(obs), self.n_model), dtype=np.float32)
                x[:, self.positions] = X
            codes = self.labels.get_indexer(obs[LABEL_COLUMN].astype(str))
            if (codes < 0).any():  # the value filter admits model labels only; anything else is a bug upstream
                raise RuntimeError(f"Streamed cells with labels outside the model: {obs[LABEL_COLUMN][codes < 0]}")
            yield {
                "x": torch.from_numpy(np.ascontiguousarray(x)),
                "y": torch.from_numpy(codes.astype(np.int64)),
                "soma_joinid": torch.from_numpy(obs["soma_joinid"].to_numpy().astype(np.int64)),
            }

    def __len__(self) -> int:
        return len(self.dataset)

    def next_epoch(self) -> None:
        """Advance to the next pass (called in the main process before the loader starts its workers)."""
        # tiledbsoma-ml 0.1.0 records the epoch but shuffles with the seed alone, so the order would repeat every
        # epoch: fold the epoch into the seed (the same on every rank, so rank partitions stay disjoint).
        self.dataset.set_epoch(self.epoch)
        self.dataset.seed = (self.base_seed + 1_000_003 * self.epoch) % 2**32
        self.epoch += 1


class CensusDataModule(pl.LightningDataModule):
    """Streams training batches from a census query with ``tiledbsoma_ml.ExperimentDataset``.

    Selects cells with scTab's filters (primary data, :data:`SCTAB_ASSAYS`) whose ``cell_type_ontology_term_id``
    is one of the model's labels: only those train, since the loss needs a label code; cells annotated with finer
    descendant terms are left out of training (score them with :func:`get_query_anndata` and
    :meth:`~schce.HCEClassifier.evaluate`). Counts stream in shuffled I/O batches; memory is bounded by
    ``io_batch_size``, not by the size of the census.

    Batches are ``{"x": (B, n_model_genes) float32 raw counts in model gene order, "y": (B,) int64 codes into
    model.hierarchy.labels, "soma_joinid": (B,) int64}``.

    Under DDP every rank reads a disjoint, equally sized share of the cells (``ExperimentDataset`` partitions by
    rank and by DataLoader worker; the rank is taken from the Lightning trainer in :meth:`setup`), and every epoch
    reshuffles with ``seed`` and the epoch number.

    Parameters
    ----------
    census
        An opened census (``cellxgene_census.open_soma(census_version=...)``), a local store in the census layout
        (``tiledbsoma.open(path)``), or a ``tiledbsoma.Experiment``.
    model
        The :class:`~schce.HCEClassifier` to train; its labels select the cells and its genes the columns.
    obs_value_filter
        An extra SOMA value filter on ``obs``, combined with ``and``.
    organism
        Experiment under ``census_data`` (ignored when ``census`` is an experiment).
    batch_size
        Cells per training step.
    validation_size
        Fraction of the selected cells held out as a validation set (random, with ``seed``); ``0`` for none.
    primary_only, assays, gene_column, measurement_name, X_name
        As in :func:`get_query_anndata`.
    io_batch_size, shuffle_chunk_size
        ``ExperimentDataset`` read size (cells per read, shuffled together) and shuffle granularity (runs of
        contiguous cells); ``io_batch_size`` must be a multiple of ``shuffle_chunk_size``.
    use_eager_fetch
        Read the next I/O batch in a background thread while the current one trains (hides the latency of the
        remote census).
    num_workers
        DataLoader worker processes (started with ``spawn``, as TileDB needs).
    seed
        Seeds the validation split and the shuffle; the same on every rank.

    Attributes
    ----------
    n_train, n_validation
        Selected cells in each split.

    The module implements :class:`~schce.data.HCEDataModule`: :meth:`label_counts` gives the training cells per
    model label (for class weights).
    """

    #: Streamed: nothing is held in memory for full-batch training; no stored class weights; no batch codes.
    n_values = None
    class_weights = None
    n_batches = 1

    def __init__(
        self,
        census,
        model: HCEClassifier,
        obs_value_filter: str | None = None,
        organism: str = "homo_sapiens",
        batch_size: int = 2048,
        validation_size: float = 0.0,
        *,
        primary_only: bool = True,
        assays: Sequence[str] | None = SCTAB_ASSAYS,
        gene_column: str | None = None,
        measurement_name: str = "RNA",
        X_name: str = "raw",
        io_batch_size: int = 65_536,
        shuffle_chunk_size: int = 64,
        use_eager_fetch: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        tiledbsoma = _require_soma()
        ml = _require_soma_ml()
        _cache_soma_ml_kernels()
        check_batch_size(batch_size)
        if not 0 <= validation_size < 1:
            raise ValueError(f"validation_size must be in [0, 1), got {validation_size}.")
        if io_batch_size % shuffle_chunk_size:
            raise ValueError(
                f"io_batch_size ({io_batch_size}) must be a multiple of shuffle_chunk_size ({shuffle_chunk_size})."
            )
        exp = _experiment_of(census, tiledbsoma, organism, measurement_name, X_name)
        self.genes = _GeneMap(exp, measurement_name, model, gene_column)
        self.labels = tuple(model.hierarchy.labels)
        self.value_filter = _value_filter(self.labels, primary_only, assays, obs_value_filter)
        with exp.axis_query(
            measurement_name,
            obs_query=tiledbsoma.AxisQuery(value_filter=self.value_filter),
            var_query=tiledbsoma.AxisQuery(coords=(self.genes.joinids,)),
        ) as query:
            obs = query.obs(column_names=["soma_joinid", LABEL_COLUMN]).concat().to_pandas()
            if len(obs) < 2:
                raise ValueError(f"{len(obs)} census cell(s) match {self.value_filter[:500]}; training needs more.")
            # Built once here (it reads the joinids); setup() copies it per rank.
            base = ml.ExperimentDataset(
                query,
                layer_name=X_name,
                obs_column_names=["soma_joinid", LABEL_COLUMN],
                batch_size=batch_size,
                io_batch_size=io_batch_size,
                shuffle=True,
                shuffle_chunk_size=shuffle_chunk_size,
                seed=seed,
                use_eager_fetch=use_eager_fetch,
            )
        # X columns arrive in the query's var order; place them at the model's gene positions.
        var_order = base.query_ids.var_joinids
        self._positions = self.genes.positions[pd.Index(self.genes.joinids).get_indexer(var_order)]
        if validation_size > 0:
            self._base_train, self._base_validation = base.random_split(1 - validation_size, validation_size, seed=seed)
        else:
            self._base_train, self._base_validation = base, None
        train_ids = self._base_train.query_ids.obs_joinids
        in_train = obs["soma_joinid"].isin(train_ids).to_numpy()
        codes = pd.Index(self.labels).get_indexer(obs[LABEL_COLUMN].astype(str)[in_train])
        self._train_counts = np.bincount(codes, minlength=len(self.labels))
        self.n_train = len(train_ids)
        self.n_validation = 0 if self._base_validation is None else len(self._base_validation.query_ids.obs_joinids)
        self.batch_size, self.io_batch_size, self.shuffle_chunk_size = batch_size, io_batch_size, shuffle_chunk_size
        self.num_workers, self.seed = num_workers, seed
        self._train: _LabelledBatches | None = None
        self._validation: _LabelledBatches | None = None
        logger.info(
            "Census query: %d training and %d validation cells, %d of %d model genes found.",
            self.n_train,
            self.n_validation,
            len(self.genes.positions),
            self.genes.n_model,
        )

    @property
    def n_genes(self) -> int:
        """Genes per cell: the model's."""
        return self.genes.n_model

    def n_cells(self, split: str) -> int:
        """Selected cells in a split (no test split: score held-out cells with :func:`get_query_anndata`)."""
        check_split(split)
        return {"train": self.n_train, "val": self.n_validation, "test": 0}[split]

    def label_counts(self, split: str = "train") -> np.ndarray:
        """Training cells per model label (other splits are not counted ahead of streaming)."""
        if split != "train":
            raise ValueError(f"The census module counts the training labels only, not {split!r}.")
        return self._train_counts

    def scaling_loader(self):
        """The training loader; the runner stops after :data:`~schce._constants.SCALING_SAMPLE` cells."""
        return self.train_dataloader(), SCALING_SAMPLE

    def annotation_targets(self, hierarchy, label_semantics: str) -> np.ndarray:
        """Not available: streamed cells are not read ahead of training to learn what each label means."""
        raise ValueError(
            "loss='hce-aware' reads label meanings from the training cells, which census training does not do yet; "
            "build the model with loss='hce'."
        )

    def resumable_order(self) -> None:
        """A resumed run restarts the interrupted epoch's order."""
        return None

    def read_obs(self, split: str) -> pd.DataFrame:
        """No per-cell metadata is kept (batches are scored by position)."""
        check_split(split)
        return pd.DataFrame()

    def test_dataloader(self) -> list:
        """No test split (an empty list)."""
        return []

    def _dataset(self, base, shuffle: bool) -> _LabelledBatches:
        from attrs import evolve

        ds = evolve(base, shuffle=shuffle)
        if self.trainer is not None:
            # ExperimentDataset takes the rank from LOCAL_RANK under Lightning, which repeats across nodes: use the
            # trainer's global rank and world size.
            ds.rank, ds.world_size = int(self.trainer.global_rank), int(self.trainer.world_size)
        return _LabelledBatches(ds, self._positions, self.genes.n_model, self.labels)

    def setup(self, stage: str | None = None) -> None:
        """Build the per-rank datasets (called by Lightning on every rank after the process group starts)."""
        self._train = self._dataset(self._base_train, shuffle=True)
        if self._base_validation is not None:
            self._validation = self._dataset(self._base_validation, shuffle=False)

    def _loader(self, ds: _LabelledBatches) -> DataLoader:
        kwargs: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available()}
        if self.num_workers > 0:
            kwargs["multiprocessing_context"] = "spawn"
        return EpochLoader(ds, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        if self._train is None:
            self.setup("fit")
        return self._loader(self._train)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in store order (an empty list without a validation split)."""
        if self._train is None:
            self.setup("fit")
        return [] if self._validation is None else self._loader(self._validation)
