"""Census functions against local SOMA stores in the census layout (no network)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata import AnnData
from conftest import SMALL_MLP

tiledbsoma = pytest.importorskip("tiledbsoma")
pytest.importorskip("tiledbsoma_ml")
pytest.importorskip("cellxgene_census")

import pyarrow as pa  # noqa: E402
import tiledbsoma.io  # noqa: E402, F811

from schce.data import census as sc_census  # noqa: E402
from schce.nn import densify  # noqa: E402

N_MISSING = 10  # model genes absent from the census (zero-filled)
FINER = "CL:0000787"  # memory B cell, a descendant of the model label B cell (CL:0000236)
OUTSIDE = "CL:0000066"  # epithelial cell: neither a model label nor a descendant of one


def _gene_ids(n: int, start: int = 0) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(start, start + n)]


def _datasets_frame(ids: list[str]) -> pa.Table:
    return pa.table(
        {
            "soma_joinid": pa.array(np.arange(len(ids)), type=pa.int64()),
            "dataset_id": ids,
            "dataset_title": [f"title of {i}" for i in ids],
            "dataset_total_cell_count": pa.array(np.full(len(ids), 10), type=pa.int64()),
        }
    )


def _write_store(uri: str, adata: AnnData | None, dataset_ids: list[str]) -> None:
    """A SOMA collection in the census layout; ``adata`` goes to census_data/homo_sapiens (RNA, X layer raw)."""
    tiledbsoma.Collection.create(uri).close()
    with tiledbsoma.Collection.open(uri, "w") as root:
        info = root.add_new_collection("census_info")
        table = _datasets_frame(dataset_ids)
        with info.add_new_dataframe(
            "datasets", schema=table.schema, index_column_names=["soma_joinid"], domain=[(0, len(table) - 1)]
        ) as df:
            df.write(table)
        if adata is not None:
            data = root.add_new_collection("census_data")
            exp_uri = f"{uri}/census_data/homo_sapiens"
            tiledbsoma.io.from_anndata(exp_uri, adata, "RNA", X_layer_name="raw", obs_id_name="obs_id")
            with tiledbsoma.Experiment.open(exp_uri) as exp:
                data.set("homo_sapiens", exp, use_relative_uri=True)


@pytest.fixture(scope="module")
def census_source(pbmc):
    """The cells and genes written to the store, with the filter cases marked in obs["case"]."""
    rng = np.random.default_rng(0)
    genes = _gene_ids(pbmc.n_vars)
    counts = pbmc.X.toarray().astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type_ontology_term_id": pbmc.obs["cell_type_ontology_term_id"].astype(str).to_numpy(),
            "assay": "10x 3' v2",
            "is_primary_data": True,
            "dataset_id": np.where(np.arange(pbmc.n_obs) % 2 == 0, "ds-a", "ds-b"),
            "donor_id": "donor-1",
            "case": "kept",
        },
        index=pbmc.obs_names.astype(str),
    )
    b_cells = np.flatnonzero(obs["cell_type_ontology_term_id"] == "CL:0000236")
    others = np.flatnonzero(obs["cell_type_ontology_term_id"] != "CL:0000236")
    picks = rng.choice(others, size=15, replace=False)
    obs.iloc[b_cells[:5], obs.columns.get_loc("cell_type_ontology_term_id")] = FINER
    obs.iloc[b_cells[:5], obs.columns.get_loc("case")] = "finer"
    obs.iloc[picks[:5], obs.columns.get_loc("is_primary_data")] = False
    obs.iloc[picks[:5], obs.columns.get_loc("case")] = "not primary"
    obs.iloc[picks[5:10], obs.columns.get_loc("assay")] = "Smart-seq2"
    obs.iloc[picks[5:10], obs.columns.get_loc("case")] = "not 10x"
    obs.iloc[picks[10:], obs.columns.get_loc("cell_type_ontology_term_id")] = OUTSIDE
    obs.iloc[picks[10:], obs.columns.get_loc("case")] = "outside"
    # New release only: a third dataset.
    obs.iloc[-20:, obs.columns.get_loc("dataset_id")] = "ds-c"
    for c in ("cell_type_ontology_term_id", "assay", "dataset_id", "donor_id"):
        obs[c] = obs[c].astype("category")
    return AnnData(X=counts, obs=obs, var=pd.DataFrame({"feature_name": pbmc.var_names.astype(str)}, index=genes))


@pytest.fixture(scope="module")
def census_paths(census_source, tmp_path_factory):
    """Two releases: ``new`` holds the cells (datasets ds-a, ds-b, ds-c), ``old`` lists ds-a and ds-b only."""
    root = tmp_path_factory.mktemp("census")
    src = census_source
    # The census lacks the first N_MISSING genes, has 20 genes the model lacks, and orders var differently.
    extra = AnnData(
        X=np.ones((src.n_obs, 20), dtype=np.float32),
        obs=src.obs[[]],
        var=pd.DataFrame({"feature_name": [f"EXTRA{i}" for i in range(20)]}, index=_gene_ids(20, 900_000)),
    )
    kept = src[:, N_MISSING:]
    store = AnnData(
        X=sp.csr_matrix(np.hstack([extra.X, kept.X])[:, ::-1]),
        obs=src.obs.drop(columns="case"),
        var=pd.concat([extra.var, kept.var]).iloc[::-1],
    )
    store.var["feature_id"] = store.var_names
    store.var["feature_length"] = 1000
    new, old = str(root / "new"), str(root / "old")
    _write_store(new, store, ["ds-a", "ds-b", "ds-c"])
    _write_store(old, None, ["ds-a", "ds-b"])
    return {"new": new, "old": old}


@pytest.fixture
def census_model(census_source):
    """A small model on Ensembl IDs over every source gene (census_source has the model's 10 labels)."""
    import schce

    keep = census_source.obs["case"] == "kept"
    adata = census_source[keep.to_numpy()].copy()
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type_ontology_term_id"].cat.remove_unused_categories()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    return schce.HCEClassifier(adata, **SMALL_MLP)


def test_ood_datasets(census_paths):
    with tiledbsoma.open(census_paths["new"]) as new, tiledbsoma.open(census_paths["old"]) as old:
        ood = sc_census.ood_datasets(new, old)
        assert ood["dataset_id"].tolist() == ["ds-c"]
        assert ood["dataset_title"].tolist() == ["title of ds-c"]
        assert sc_census.ood_datasets(old, new).empty


def test_missing_extra_explains_install(census_paths, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # as if the census extra were not installed
    with pytest.raises(ImportError, match=r"pip install 'schce\[census\]'"):
        sc_census.ood_datasets(None, None)


def test_ood_datasets_bad_layout(census_paths):
    with tiledbsoma.open(census_paths["new"]) as new:
        with pytest.raises(KeyError, match="census_info"):
            sc_census.ood_datasets(new["census_data"], new)


def test_get_query_anndata_filters_and_genes(census_paths, census_source, census_model):
    with tiledbsoma.open(census_paths["new"]) as census:
        adata = sc_census.get_query_anndata(census, census_model, chunk_size=128, progress=False)
    src = census_source
    expected = src.obs_names[src.obs["case"].isin(["kept", "finer"]).to_numpy()]
    source_rows = src.obs_names.get_indexer(adata.obs["obs_id"])
    assert sorted(adata.obs["obs_id"]) == sorted(expected)
    # The finer label is kept as it is, for evaluation with the hierarchy rule.
    assert (adata.obs["cell_type_ontology_term_id"] == FINER).sum() == 5
    assert adata.obs["is_primary_data"].all() and set(adata.obs["assay"]) == {"10x 3' v2"}
    assert {"dataset_id", "donor_id", "soma_joinid"} <= set(adata.obs.columns)
    # Raw counts over the model's genes in model order; the genes missing from the census are zero columns.
    assert list(adata.var_names) == census_model.genes
    assert sp.issparse(adata.X) and adata.X.dtype == np.float32
    want = src.X[source_rows].copy()
    want[:, :N_MISSING] = 0
    np.testing.assert_array_equal(adata.X.toarray(), want)
    assert adata.var["in_census"].sum() == len(census_model.genes) - N_MISSING
    assert adata.uns["census_query"]["gene_overlap"]["n_found"] == len(census_model.genes) - N_MISSING
    assert adata.uns["census_query"]["gene_column"] == "feature_id"


def test_get_query_anndata_options(census_paths, census_source, census_model):
    src = census_source
    with tiledbsoma.open(census_paths["new"]) as census:
        exact = sc_census.get_query_anndata(
            census,
            census_model,
            obs_value_filter="dataset_id in ['ds-a', 'ds-c']",
            include_descendants=False,
            assays=None,
            primary_only=False,
            obs_column_names=["cell_type_ontology_term_id", "dataset_id", "obs_id"],
            progress=False,
        )
        case = src.obs["case"].to_numpy()
        want = src.obs_names[
            np.isin(case, ["kept", "not primary", "not 10x"]) & src.obs["dataset_id"].isin(["ds-a", "ds-c"])
        ]
        assert sorted(exact.obs["obs_id"]) == sorted(want)
        assert list(exact.obs.columns) == ["soma_joinid", "cell_type_ontology_term_id", "dataset_id", "obs_id"]
        with pytest.raises(ValueError, match="No census cells match"):
            sc_census.get_query_anndata(census, census_model, obs_value_filter="dataset_id == 'nope'", progress=False)
        with pytest.raises(KeyError, match="mus_musculus"):
            sc_census.get_query_anndata(census, census_model, organism="mus_musculus", progress=False)


def test_query_anndata_evaluates(census_paths, census_model):
    """The query AnnData goes straight into predict/evaluate; finer labels are scored against the model label."""
    with tiledbsoma.open(census_paths["new"]) as census:
        adata = sc_census.get_query_anndata(census, census_model, progress=False)
    census_model.train(max_epochs=1, validation_size=0, seed=0, enable_progress_bar=False, calibrate=False)
    result = census_model.evaluate(adata, labels_key="cell_type_ontology_term_id")
    assert result["n_cells"] == adata.n_obs
    # Every cell is scorable: the memory B cells against their model ancestor, B cell.
    assert result["n_scored"] == adata.n_obs


def test_census_datamodule_batches(census_paths, census_source, census_model):
    src = census_source
    with tiledbsoma.open(census_paths["new"]) as census:
        dm = sc_census.CensusDataModule(
            census,
            census_model,
            batch_size=64,
            validation_size=0.2,
            io_batch_size=256,
            shuffle_chunk_size=16,
            seed=1,
            use_eager_fetch=False,
        )
    n_kept = int((src.obs["case"] == "kept").sum())
    assert dm.n_train + dm.n_validation == n_kept
    assert dm.label_counts("train").sum() == dm.n_train
    dm.setup("fit")
    labels = census_model.hierarchy.labels
    want_codes = pd.Index(labels).get_indexer(src.obs["cell_type_ontology_term_id"].astype(str))
    seen = []
    for batch in dm.train_dataloader():
        assert "x_values" in batch  # CSR batches by default
        x = densify(batch)
        assert x.dtype.is_floating_point and x.shape[1] == len(census_model.genes)
        rows = batch["soma_joinid"].numpy()  # joinids are the store's row numbers
        np.testing.assert_array_equal(batch["y"].numpy(), want_codes[rows])
        want = src.X[rows].copy()
        want[:, :N_MISSING] = 0
        np.testing.assert_array_equal(x.numpy(), want)
        seen.append(rows)
    seen = np.concatenate(seen)
    val = np.concatenate([b["soma_joinid"].numpy() for b in dm.val_dataloader()])
    assert len(set(seen)) == len(seen) == dm.n_train
    assert not set(seen) & set(val)
    # Every streamed cell is a filtered one: model label, primary, 10x.
    assert set(src.obs["case"].iloc[np.concatenate([seen, val])]) == {"kept"}
    # A new epoch reshuffles.
    again = np.concatenate([b["soma_joinid"].numpy() for b in dm.train_dataloader()])
    assert sorted(again) == sorted(seen) and not np.array_equal(again, seen)
    # The dense format carries the same values as "x".
    with tiledbsoma.open(census_paths["new"]) as census:
        dense = sc_census.CensusDataModule(
            census,
            census_model,
            batch_size=64,
            validation_size=0.2,
            io_batch_size=256,
            shuffle_chunk_size=16,
            seed=1,
            use_eager_fetch=False,
            batch_format="dense",
        )
        dense.setup("fit")
        for batch in dense.val_dataloader():
            assert "x" in batch
            want = src.X[batch["soma_joinid"].numpy()].copy()
            want[:, :N_MISSING] = 0
            np.testing.assert_array_equal(batch["x"].numpy(), want)


def test_census_datamodule_ranks(census_paths, census_model):
    """Under DDP each rank (taken from the trainer) streams a disjoint, equally sized share of the cells."""
    from types import SimpleNamespace

    with tiledbsoma.open(census_paths["new"]) as census:
        dm = sc_census.CensusDataModule(
            census, census_model, batch_size=64, io_batch_size=1024, shuffle_chunk_size=16, use_eager_fetch=False
        )
    shares = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("fit")
        shares.append(np.concatenate([b["soma_joinid"].numpy() for b in dm.train_dataloader()]))
    assert len(shares[0]) == len(shares[1]) == dm.n_train // 2
    assert not set(shares[0]) & set(shares[1])


def test_census_datamodule_bad_input(census_paths, census_source, census_model):
    with tiledbsoma.open(census_paths["new"]) as census:
        with pytest.raises(ValueError, match="multiple of shuffle_chunk_size"):
            sc_census.CensusDataModule(census, census_model, io_batch_size=100, shuffle_chunk_size=64)
        with pytest.raises(ValueError, match="batch_size"):
            sc_census.CensusDataModule(census, census_model, batch_size=1)
        from_experiment = sc_census.CensusDataModule(census["census_data"]["homo_sapiens"], census_model)
        assert from_experiment.n_train == int((census_source.obs["case"] == "kept").sum())
        with pytest.raises(ValueError, match="training needs more"):
            sc_census.CensusDataModule(census, census_model, obs_value_filter="dataset_id == 'nope'")
        with pytest.raises(ValueError, match="source_column='study' is not a census obs column"):
            sc_census.CensusDataModule(census, census_model, source_column="study")


def test_streaming_training(census_paths, census_source, census_model):
    """HCETrainingPlan fitted by a Lightning Trainer on the datamodule: the loss falls and the weights move."""
    import lightning.pytorch as pl

    from schce.train import HCETrainingPlan, HistoryRecorder

    pl.seed_everything(0, workers=True, verbose=False)
    with tiledbsoma.open(census_paths["new"]) as census:
        dm = sc_census.CensusDataModule(
            census,
            census_model,
            batch_size=64,
            validation_size=0.2,
            io_batch_size=1024,
            shuffle_chunk_size=16,
            seed=0,
            use_eager_fetch=False,
        )
    before = [p.detach().clone() for p in census_model.module.parameters()]
    plan = HCETrainingPlan(census_model.module, census_model.hierarchy.R, lr=5e-3, lr_gamma=1.0)
    history = HistoryRecorder()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[history],
    )
    trainer.fit(plan, datamodule=dm)
    losses = [v for _, v in history.history["train_loss"]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert "validation_loss" in history.history
    assert any(bool((a != b.detach()).any()) for a, b in zip(before, census_model.module.parameters(), strict=True))


def test_model_train_on_the_census_datamodule(census_paths, census_source):
    """model.train(datamodule=) takes the census datamodule too: validation, class weights and calibration run."""
    import schce

    keep = (census_source.obs["case"] == "kept").to_numpy()
    adata = census_source[keep].copy()
    adata.obs["cell_type_ontology_term_id"] = adata.obs["cell_type_ontology_term_id"].cat.remove_unused_categories()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, loss="hce", **SMALL_MLP)
    with tiledbsoma.open(census_paths["new"]) as census:
        dm = sc_census.CensusDataModule(
            census,
            model,
            batch_size=64,
            validation_size=0.2,
            io_batch_size=1024,
            shuffle_chunk_size=16,
            seed=0,
            use_eager_fetch=False,
        )
    # the macro validation loss needs validation label counts, which a streaming census module does not have
    with pytest.raises(ValueError, match=r'macro_loss" weighs validation cells .* CensusDataModule .*"weighted_loss"'):
        model.train(datamodule=dm, max_epochs=2, early_stopping_monitor="macro_loss", enable_progress_bar=False)
    assert not model.is_trained_
    model.train(datamodule=dm, max_epochs=2, seed=0, enable_progress_bar=False)
    assert model.is_trained_ and "validation_corrected_macro_f1" in model.history_
    # The annotation-aware default reads label meanings from the query's obs (dataset_id): the same masks as the
    # AnnData path on the same cells, and the batches carry them.
    aware = schce.HCEClassifier(adata, **SMALL_MLP)
    masks = dm.annotation_targets(aware.hierarchy, "auto")
    codes = aware.hierarchy.label_index(adata.obs["cell_type_ontology_term_id"].astype(str).to_numpy())
    expected, rows = aware.hierarchy.annotation_targets(codes, adata.obs["dataset_id"].astype(str).to_numpy())
    np.testing.assert_array_equal(masks, expected)
    row_of = dict(zip(np.flatnonzero(keep).tolist(), rows.tolist(), strict=True))  # joinids: rows of the source
    for batch in dm.train_dataloader():
        want = [row_of[j] for j in batch["soma_joinid"].tolist()]
        np.testing.assert_array_equal(masks[batch["target"].numpy()], expected[want])
    aware.train(datamodule=dm, max_epochs=1, seed=0, enable_progress_bar=False)
    assert aware.is_trained_ and aware.loss == "hce-aware"
