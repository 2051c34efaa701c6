"""The sctab recipe preset, scTab's augmentation matrix and its use in training only."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _private import RECIPES, augment, matmul_precision
from conftest import SMALL_MLP

import schce
from schce.data import augmentation_matrix
from schce.nn import normalize_counts
from schce.train import HCETrainingPlan


def test_augmentation_matrix_values():
    # Label a: groups g1 and g2 (means differ by [1, 0.2, -2]); label b: one group, so no row.
    X = np.array([[1.0, 0.0, 3.0], [1.0, 0.4, 3.0], [0.0, 0.0, 5.0], [0.0, 0.0, 5.0], [9, 9, 9]], dtype=np.float32)
    labels = np.array(["a", "a", "a", "a", "b"])
    groups = np.array(["g1", "g1", "g2", "g2", "g1"])
    out = augmentation_matrix(X, labels, groups, normalize=False)
    # mean g1 − mean g2 = [1, 0.2, −2]: 0.2 ≤ 0.25 is zeroed, −2 is clipped to −1.5
    np.testing.assert_allclose(out, [[1.0, 0.0, -1.5]])
    assert out.dtype == np.float32
    # rows restricts the cells used: without the g2 cells there is no pair left
    assert augmentation_matrix(X, labels, groups, normalize=False, rows=[0, 1, 4]).shape == (0, 3)


def test_augmentation_matrix_normalises_counts_and_caps_pairs():
    rng = np.random.default_rng(0)
    X = rng.poisson(3, size=(60, 8)).astype(np.float32)
    labels = np.repeat(["a", "b"], 30)
    groups = np.tile(np.repeat(["g1", "g2", "g3"], 10), 2)
    out = augmentation_matrix(X, labels, groups, threshold=0.0, clip=100)
    assert out.shape == (6, 8)  # 3 pairs per label
    logx = normalize_counts(torch.from_numpy(X)).double().numpy()
    diffs = [
        logx[(labels == lab) & (groups == g)].mean(0) - logx[(labels == lab) & (groups == h)].mean(0)
        for lab in ("a", "b")
        for g, h in (("g1", "g2"), ("g1", "g3"), ("g2", "g3"))
    ]
    np.testing.assert_allclose(out, np.stack(diffs), rtol=1e-5, atol=1e-6)
    assert augmentation_matrix(X, labels, groups, max_per_label=1).shape == (2, 8)
    with pytest.raises(ValueError, match="one entry per cell"):
        augmentation_matrix(X, labels[:5], groups)


def test_augment_adds_a_signed_row_and_clamps():
    torch.manual_seed(0)
    x = torch.full((500, 2), 1.0)
    out = augment(x, torch.tensor([[0.5, 10.0]]))
    assert set(out[:, 0].tolist()) == {0.5, 1.5}  # both signs occur
    assert set(out[:, 1].tolist()) == {0.0, 9.0}  # clamped to [0, 9]


def test_augmentation_changes_training_inputs_only(trained):
    """The classifier sees augmented inputs in training steps, the unchanged inputs in validation and prediction."""
    n_genes = len(trained.genes)
    plan = HCETrainingPlan(
        trained.module, trained.hierarchy.R, augmentations=np.full((3, n_genes), 0.5, dtype=np.float32)
    )
    seen = []
    # What enters the module (its own standardisation and input dropout come after): (x, whether it normalises x).
    hook = trained.module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].clone(), kwargs["normalize"])), with_kwargs=True
    )
    x = torch.poisson(torch.full((8, n_genes), 2.0))
    batch = {"x": x, "y": torch.zeros(8, dtype=torch.long), "batch": torch.zeros(8, dtype=torch.long)}
    try:
        trained.module.train()
        plan.training_step(batch, 0)
        trained.module.eval()
        plan.validation_step(batch, 0)
    finally:
        hook.remove()
        plan._val_true.clear()
        plan._val_pred.clear()
    clean = normalize_counts(x)
    # each training row is the normalised input plus or minus the (constant 0.5) row, clamped to [0, 9]
    plus, minus = (clean + 0.5).clamp(0, 9), (clean - 0.5).clamp(0, 9)
    (train_x, train_normalize), (val_x, val_normalize) = seen
    row_plus = torch.isclose(train_x, plus).all(1)
    row_minus = torch.isclose(train_x, minus).all(1)
    assert (row_plus | row_minus).all() and not train_normalize
    # validation passes the counts untouched, normalised inside the module
    torch.testing.assert_close(val_x, x)
    assert val_normalize


def test_train_with_augmentation_runs_and_predictions_are_deterministic(pbmc):
    adata = pbmc.copy()
    adata.obs["sample"] = np.where(np.arange(adata.n_obs) % 2, "s1", "s2")
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id", batch_key="sample")
    runs = []
    for _ in range(2):
        model = schce.HCEClassifier(adata, **SMALL_MLP)
        model.train(max_epochs=2, seed=0, augment=True, enable_progress_bar=False)
        runs.append(model.predict(adata, inplace=False)["schce_prediction"].to_numpy())
    np.testing.assert_array_equal(*runs)
    with pytest.raises(ValueError, match="rows, "):
        model.train(max_epochs=1, augment=np.zeros((2, 3)))


def test_sctab_recipe_preset(pbmc, tmp_path):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    mlp = schce.HCEClassifier(adata, recipe="sctab")
    # scTab's MLP: 8 blocks of 128 units with dropout 0.1
    assert len(mlp.module.classifier.encoder) == 8 * 4 and mlp.module.classifier.n_latent == 128
    assert mlp.module.classifier.encoder[3].p == 0.1
    assert RECIPES["sctab"]["mlp"].lr == 2e-3 and RECIPES["sctab"]["tabnet"].weight_decay == 0.05
    assert RECIPES["sctab"]["linear"].lr_gamma == 0.9
    seen = {}

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
            seen.update(lr=opt.defaults["lr"], wd=opt.defaults["weight_decay"], gamma=sched.gamma)
            seen.update(clip=trainer.gradient_clip_val, precision=torch.get_float32_matmul_precision())

    before = torch.get_float32_matmul_precision()
    mlp.train(max_epochs=1, seed=0, enable_progress_bar=False, callbacks=[Record()])
    assert seen == {"lr": 2e-3, "wd": 0.05, "gamma": 0.9, "clip": 1.0, "precision": "high"}
    assert torch.get_float32_matmul_precision() == before  # restored after training
    # explicit arguments override the recipe; the recipe survives save/load
    mlp.train(max_epochs=1, lr=1e-4, lr_gamma=0.5, enable_progress_bar=False, callbacks=[Record()])
    assert seen["lr"] == 1e-4 and seen["gamma"] == 0.5 and seen["wd"] == 0.05
    mlp.save(tmp_path / "m")
    assert schce.HCEClassifier.load(tmp_path / "m", accelerator="cpu").recipe == "sctab"
    with pytest.raises(ValueError, match="Unknown recipe"):
        schce.HCEClassifier(adata, recipe="nope")


def test_matmul_precision_is_restored_after_an_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(RuntimeError), matmul_precision("medium"):
        assert torch.get_float32_matmul_precision() == "medium"
        raise RuntimeError
    assert torch.get_float32_matmul_precision() == before


def test_accelerator_and_precision_reach_lightning(trained):
    seen = {}

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(accelerator=type(trainer.accelerator).__name__, precision=trainer.precision)

    model = schce.HCEClassifier(trained.adata, **SMALL_MLP)
    model.train(
        max_epochs=1, accelerator="cpu", precision="bf16-mixed", enable_progress_bar=False, callbacks=[Record()]
    )
    assert seen == {"accelerator": "CPUAccelerator", "precision": "bf16-mixed"}
    # mixed precision with gradient clipping: the fused CPU AdamW (which unscales itself) is not used
    assert model.history["train_loss"].notna().all().all()
