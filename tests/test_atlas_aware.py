"""Annotation-aware HCE (``loss="hce-aware"``) on scTab stores: label meanings read from the code columns only."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
from conftest import SMALL_MLP, Crash, CrashAfter

import schce
from schce.data import AnnDataModule, SCTabStoreDataModule, convert_sctab_store, write_sctab_store

N_GENES = 40
LABELS_KEY = "cell_type_ontology_term_id"


@pytest.fixture(scope="module")
def atlas():
    # Coarse datasets beside fine ones: the same label means different sets in different datasets.
    return schce.datasets.simulate_atlas(
        1500, n_genes=N_GENES, n_cell_types=8, library_size=200, coarse_fraction=0.4, seed=1, progress=False
    )


@pytest.fixture(scope="module")
def stores(atlas, tmp_path_factory):
    root = tmp_path_factory.mktemp("aware")
    dense = write_sctab_store(atlas, root / "dense", split_key="donor_id", rows_per_part=1024)
    return {"dense": dense, "compact": convert_sctab_store(dense, root / "compact")}


def _seen(dm: SCTabStoreDataModule) -> np.ndarray:
    """Atlas rows of the store's training and validation cells."""
    return np.concatenate([dm.read_obs(s).index.to_numpy() for s in ("train", "val")])


@pytest.mark.parametrize("layout", ["dense", "compact"])
@pytest.mark.parametrize("semantics", ["auto", "inclusive", "exclusive"])
def test_store_masks_equal_the_masks_of_the_same_cells_in_memory(atlas, stores, layout, semantics):
    dm = SCTabStoreDataModule(stores[layout], batch_size=128, num_workers=0)
    h = schce.HCEClassifier.from_sctab_store(stores[layout], **SMALL_MLP).hierarchy
    seen = _seen(dm)
    codes = h.label_index(atlas.obs[LABELS_KEY].astype(str).to_numpy()[seen])
    expected, rows = h.annotation_targets(codes, atlas.obs["dataset_id"].astype(str).to_numpy()[seen], semantics)
    masks = dm.annotation_targets(h, semantics)
    np.testing.assert_array_equal(masks, expected)
    if semantics == "auto":
        assert len(masks) > h.n_labels - 1  # coarse and fine sources give one label several meanings
    # Every training and validation batch carries each cell's row of the same masks.
    row_of = dict(zip(seen.tolist(), rows.tolist(), strict=True))
    n = 0
    for split in ("train", "val"):
        for batch in dm.train_dataloader() if split == "train" else dm.val_dataloader():
            want = [row_of[i] for i in batch["idx"].tolist()]
            np.testing.assert_array_equal(masks[batch["target"].numpy()], expected[want])
            n += len(batch["idx"])
    assert n == len(seen)
    assert "target" not in next(iter(dm.test_dataloader()))


def test_label_usage_is_read_per_source_column(stores):
    from _private import label_usage

    used = label_usage(stores["dense"], "dataset_id")
    by_donor = label_usage(stores["dense"], "donor_id")
    assert used.shape[1] == by_donor.shape[1] and used.sum() <= by_donor.sum()
    assert used.any(axis=1).all()  # every dataset has training or validation cells here
    with pytest.raises(ValueError, match="source_column must be one of"):
        SCTabStoreDataModule(stores["dense"], source_column="study")


class FirstLoss(pl.Callback):
    def __init__(self):
        self.loss = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.loss is None:
            self.loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            self.targets = batch.get("target")


def test_store_and_anndata_training_take_the_same_first_step(atlas, stores):
    """One batch of all training cells: the store and the AnnData of the same cells give the same first loss."""
    sdm = SCTabStoreDataModule(stores["compact"], batch_size=2, num_workers=0, buffer_size=64)
    n_train = sdm.n_cells("train")
    sdm = SCTabStoreDataModule(stores["compact"], batch_size=n_train, num_workers=0, buffer_size=64)
    train_rows, val_rows = (sdm.read_obs(s).index.to_numpy() for s in ("train", "val"))
    kwargs = dict(max_epochs=1, seed=3, enable_progress_bar=False, calibrate=False)
    arch = {**SMALL_MLP, "dropout": 0.0, "input_dropout": 0.0}  # dropout draws would follow the order of the cells
    store_model = schce.HCEClassifier.from_sctab_store(sdm.path, standardize=False, **arch)
    assert store_model.loss == "hce-aware"
    store_first = FirstLoss()
    store_model.train(datamodule=sdm, callbacks=[store_first], **kwargs)
    assert store_first.targets is not None

    memory_model = schce.HCEClassifier.from_sctab_store(sdm.path, standardize=False, **arch)
    codes = memory_model.hierarchy.label_index(atlas.obs[LABELS_KEY].astype(str).to_numpy())
    adm = AnnDataModule(
        atlas.X,
        codes,
        memory_model.hierarchy.labels,
        train_rows,
        val_rows,
        batch_size=n_train,
        sources=atlas.obs["dataset_id"].astype(str).to_numpy(),
    )
    memory_first = FirstLoss()
    memory_model.train(datamodule=adm, callbacks=[memory_first], **kwargs)
    np.testing.assert_allclose(store_first.loss, memory_first.loss, rtol=1e-4)
    # The loss is the annotation-aware one: plain HCE on the same first step differs.
    hce_model = schce.HCEClassifier.from_sctab_store(sdm.path, loss="hce", standardize=False, **arch)
    hce_first = FirstLoss()
    hce_model.train(datamodule=sdm, callbacks=[hce_first], **kwargs)
    assert abs(hce_first.loss - store_first.loss) > 1e-3


def test_resume_keeps_the_masks_and_refuses_others(stores, tmp_path):
    import torch

    def run(source_column="dataset_id", **kwargs):
        dm = SCTabStoreDataModule(stores["dense"], batch_size=64, num_workers=0, source_column=source_column)
        model = schce.HCEClassifier.from_sctab_store(dm.path, **SMALL_MLP)
        model.train(datamodule=dm, max_epochs=2, seed=0, enable_progress_bar=False, checkpoint_dir=tmp_path, **kwargs)
        return dm, model

    steps = SCTabStoreDataModule(stores["dense"], batch_size=64, num_workers=0).train_dataloader().__len__()
    with pytest.raises(Crash):
        run(callbacks=[CrashAfter(steps + 2)])  # killed in the second epoch, after the first epoch's checkpoint
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    masks = SCTabStoreDataModule(stores["dense"], num_workers=0).annotation_targets(
        schce.HCEClassifier.from_sctab_store(stores["dense"], **SMALL_MLP).hierarchy, "auto"
    )
    np.testing.assert_array_equal(saved["schce_target_masks"].numpy(), masks)
    with pytest.raises(ValueError, match="acceptable-label sets that differ"):
        run(source_column="donor_id", ckpt_path="last")  # other sources, other label meanings
    _, resumed = run(ckpt_path="last")
    assert resumed.is_trained_ and list(resumed.history_["validation_corrected_macro_f1"].index) == [0, 1]


def test_simulate_atlas_takes_the_cell_types_parents_included():
    types = ["CL:0000084", "CL:0000624", "CL:0000625"]  # T cell beside its CD4 and CD8 children
    adata = schce.datasets.simulate_atlas(300, n_genes=30, cell_types=types, coarse_fraction=0.0, progress=False)
    assert set(adata.obs["true_cell_type_ontology_term_id"].astype(str)) <= set(types)
    assert (adata.obs["cell_type_ontology_term_id"] == adata.obs["true_cell_type_ontology_term_id"]).all()
    with pytest.raises(ValueError, match="not under it"):
        schce.datasets.simulate_atlas(100, n_genes=30, cell_types=["CL:0000084", "CL:0000066"], progress=False)
