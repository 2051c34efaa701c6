"""Lightning DDP on 2 CPU processes: disjoint shards of the training cells, one model written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


@pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP launcher")
def test_ddp_two_ranks_see_disjoint_cells_and_write_once(tmp_path):
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    # Lightning's "ddp" re-launches the script for rank 1, so it runs in its own process, not inside pytest.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    meta = json.loads((tmp_path / "model" / "schce.json").read_text())
    train = set(meta["train_indices"])
    assert len(train) % 2 == 0  # so equal shards cover every cell
    for epoch in ("0", "1"):
        a, b = (r["seen"][epoch] for r in ranks)
        assert len(a) == len(b) == len(set(a)) == len(set(b)) == len(train) // 2
        assert not set(a) & set(b)
        assert set(a) | set(b) == train
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]  # reshuffled every epoch
    # every rank validates on all validation cells: one score
    assert ranks[0]["validation_score"] == ranks[1]["validation_score"]
    # the annotation-aware masks are computed on every rank from the same cells: identical
    assert ranks[0]["target_masks"] and ranks[0]["target_masks"] == ranks[1]["target_masks"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.name.startswith("rank"))
    assert written == [
        "checkpoints",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "model",
        "model/model.pt",
        "model/schce.json",
    ]


@pytest.mark.skipif(sys.platform == "win32", reason="gloo DDP launcher")
def test_ddp_ranks_hold_identical_store_masks(tmp_path):
    """hce-aware from a store under DDP: each rank reads the masks from the files, and they are the same."""
    import numpy as np

    import schce
    from schce.data import SCTabStoreDataModule, write_sctab_store

    atlas = schce.datasets.simulate_atlas(
        3000, n_genes=30, n_cell_types=6, library_size=150, coarse_fraction=0.4, seed=2, progress=False
    )
    store = write_sctab_store(atlas, tmp_path / "store", split_key="donor_id", rows_per_part=1024)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), str(store)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"masks{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["steps"] > 0 for r in ranks)
    assert ranks[0]["target_masks"] == ranks[1]["target_masks"]
    hierarchy = schce.HCEClassifier.from_sctab_store(store, n_hidden=16, n_layers=1).hierarchy
    expected = SCTabStoreDataModule(store, num_workers=0).annotation_targets(hierarchy, "auto")
    np.testing.assert_array_equal(np.array(ranks[0]["target_masks"], dtype=bool), expected)
