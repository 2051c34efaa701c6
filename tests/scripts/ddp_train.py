"""Trains on 2 CPU processes with Lightning DDP (gloo); run as ``python ddp_train.py OUT_DIR`` (Lightning re-runs it).

Every rank writes ``OUT_DIR/rank{r}.json``: per epoch, the ids of the cells it trained on (gene ``cell_id`` holds
row + 1, so the ids come from the batches themselves), and its final validation score. Rank 0 alone should write the
model (``OUT_DIR/model``) and the checkpoints (``OUT_DIR/checkpoints``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import lightning.pytorch as pl
import numpy as np
import pandas as pd

import schce


class RecordCells(pl.Callback):
    def __init__(self, out: Path, id_column: int):
        self.out, self.id_column, self.seen = out, id_column, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = batch["x"][:, self.id_column].long().sub(1).tolist()
        self.seen.setdefault(trainer.current_epoch, []).extend(ids)

    def on_train_end(self, trainer, pl_module):
        score = float(trainer.callback_metrics["validation_corrected_macro_f1"])
        masks = pl_module.target_masks  # hce-aware (the default): each rank computes them before training
        record = {
            "world_size": trainer.world_size,
            "seen": self.seen,
            "validation_score": score,
            "target_masks": None if masks is None else masks.int().tolist(),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    rng = np.random.default_rng(0)
    n, n_genes = 200, 20
    labels = np.array(["CL:0000084", "CL:0000236"])[np.arange(n) % 2]
    counts = rng.poisson(2.0, size=(n, n_genes)).astype(np.float32)
    counts[labels == "CL:0000236", :5] += 6  # something to learn
    X = np.hstack([counts, np.arange(1, n + 1, dtype=np.float32)[:, None]])
    var = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)] + ["cell_id"])
    adata = ad.AnnData(X, obs=pd.DataFrame({"label": labels}, index=[f"c{i}" for i in range(n)]), var=var)
    schce.HCEClassifier.setup_anndata(adata, labels_key="label")
    model = schce.HCEClassifier(adata, n_hidden=16, n_layers=1)
    model.train(
        max_epochs=2,
        batch_size=16,
        seed=0,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        checkpoint_dir=out / "checkpoints",
        enable_progress_bar=False,
        callbacks=[RecordCells(out, n_genes)],
    )
    model.save(out / "model")


class RecordMasks(pl.Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        record = {
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
            "target_masks": pl_module.target_masks.int().tolist(),
        }
        (self.out / f"masks{trainer.global_rank}.json").write_text(json.dumps(record))


def main_store(out: Path, store: Path) -> None:
    """hce-aware from a scTab store: every rank computes the masks from the store's code columns."""
    dm = schce.data.SCTabStoreDataModule(store, batch_size=32, num_workers=0)
    model = schce.HCEClassifier.from_sctab_store(store, n_hidden=16, n_layers=1)
    model.train(
        datamodule=dm,
        max_epochs=1,
        seed=0,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        enable_progress_bar=False,
        calibrate=False,
        callbacks=[RecordMasks(out)],
    )


if __name__ == "__main__":
    if len(sys.argv) > 2:
        main_store(Path(sys.argv[1]), Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
