"""Training levers: an exponential moving average of the weights, label smoothing by the hierarchy, the monitor."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _private import PAPER_MONITOR, TrainConfig
from conftest import SMALL_MLP, Crash, CrashAfter

import schce
from schce.hierarchy import Hierarchy
from schce.train import HCETrainingPlan


class _Steps(pl.Callback):
    """Records the module's trainable weights after every optimiser step and the step count at each epoch's end."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self.steps_at_epoch_end: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        named = pl_module.module.named_parameters()
        self.weights.append({k: p.detach().clone() for k, p in named if p.requires_grad})

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps_at_epoch_end.append(len(self.weights))


def _independent_ema(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """``Σ_k decay^(n−k) w_k / Σ_k decay^(n−k)`` over the recorded steps, in float64."""
    n = len(weights)
    factors = torch.tensor([decay ** (n - 1 - k) for k in range(n)], dtype=torch.float64)
    factors /= factors.sum()
    return {
        name: sum(f * w[name].double() for f, w in zip(factors, weights, strict=True)).float() for name in weights[0]
    }


@pytest.fixture(scope="module")
def registered(pbmc):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    return adata


def _train(adata, **kwargs):
    model = schce.HCEClassifier(adata, **SMALL_MLP)
    model.train(seed=0, enable_progress_bar=False, **{"max_epochs": 2, **kwargs})
    return model


def _assert_weights(module, expected: dict[str, torch.Tensor], atol: float = 1e-6):
    params = dict(module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=1e-5, atol=atol, msg=name)


def test_ema_without_validation_equals_an_independent_average(registered):
    steps = _Steps()
    model = _train(registered, ema_decay=0.9, validation_size=0, calibrate=False, callbacks=[steps])
    assert len(steps.weights) == steps.steps_at_epoch_end[-1] > 20
    _assert_weights(model.module, _independent_ema(steps.weights, 0.9))
    # ...and not the last step's weights, which training alone would leave.
    last = steps.weights[-1]
    assert max((dict(model.module.named_parameters())[k] - v).abs().max().item() for k, v in last.items()) > 1e-3


def test_ema_is_what_validation_and_the_kept_epoch_see(registered):
    steps = _Steps()
    model = _train(registered, ema_decay=0.8, max_epochs=4, early_stopping=False, callbacks=[steps])
    best = model.best_epoch_
    assert best is not None
    n = steps.steps_at_epoch_end[best]
    _assert_weights(model.module, _independent_ema(steps.weights[:n], 0.8))
    # the training weights were put back after each validation: the trajectory is the one training without an
    # average follows, step for step
    plain_steps = _Steps()
    _train(registered, max_epochs=4, early_stopping=False, callbacks=[plain_steps])
    assert len(plain_steps.weights) == len(steps.weights)
    for a, b in zip(steps.weights, plain_steps.weights, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_ema_training_is_deterministic_and_differs_from_plain(registered):
    a = _train(registered, ema_decay=0.9)
    b = _train(registered, ema_decay=0.9)
    plain = _train(registered)
    for (key, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=key)
    diff = max(
        (pa - pp).abs().max().item() for pa, pp in zip(a.module.parameters(), plain.module.parameters(), strict=True)
    )
    assert diff > 1e-4


def test_ema_survives_save_and_load(registered, tmp_path):
    model = _train(registered, ema_decay=0.9)
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m")
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(loaded.module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    a, b = registered.copy(), registered.copy()
    model.predict(a)
    loaded.predict(b)
    probs, probs_loaded = a.obsm["schce_probabilities"].to_numpy(), b.obsm["schce_probabilities"].to_numpy()
    np.testing.assert_allclose(probs_loaded, probs, rtol=1e-5, atol=1e-6)


def test_resumed_run_continues_the_average(registered, tmp_path):
    reference = _train(registered, ema_decay=0.9, checkpoint_dir=tmp_path / "ref", checkpoint_every_n_steps=10)
    with pytest.raises(Crash):
        _train(
            registered,
            ema_decay=0.9,
            checkpoint_dir=tmp_path / "run",
            checkpoint_every_n_steps=10,
            callbacks=[CrashAfter(25)],
        )
    saved = torch.load(tmp_path / "run" / "last.ckpt", map_location="cpu", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("WeightAveraging")]
    assert state["n_updates"] == 20 and set(state["average"]) == {
        k for k, p in reference.module.named_parameters() if p.requires_grad
    }
    resumed = _train(
        registered, ema_decay=0.9, checkpoint_dir=tmp_path / "run", checkpoint_every_n_steps=10, ckpt_path="last"
    )
    for key, value in reference.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert resumed.best_epoch_ == reference.best_epoch_
    with pytest.raises(ValueError, match="ema_decay=0.9.*same ema_decay"):
        _train(registered, ema_decay=0.8, checkpoint_dir=tmp_path / "run", ckpt_path="last")


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 1.5])
def test_ema_decay_out_of_range_is_refused_before_work(registered, value):
    model = schce.HCEClassifier(registered, **SMALL_MLP)
    with pytest.raises(ValueError, match="ema_decay must lie strictly between 0 and 1"):
        model.train(ema_decay=value, enable_progress_bar=False)
    assert not model.is_trained_


def test_ema_with_lbfgs_is_refused(registered):
    model = schce.HCEClassifier(registered, backbone="linear")
    with pytest.raises(ValueError, match="optimizer='lbfgs' cannot train this model.*ema_decay"):
        model.train(ema_decay=0.9, optimizer="lbfgs", enable_progress_bar=False)
    # left automatic, the linear model trains with AdamW when an average is asked for
    model.train(ema_decay=0.9, max_epochs=1, enable_progress_bar=False)
    assert model.optimizer_ == "adamw"


# --- label smoothing -------------------------------------------------------------------------------------------


def _tiny_plan(loss: str, label_smoothing: float, class_weights=None):
    # A -> B -> D, A -> C; labels in this order.
    hierarchy = Hierarchy.from_edges([("B", "A"), ("C", "A"), ("D", "B")], labels=["A", "B", "C", "D"])
    torch.manual_seed(0)
    module = schce.nn.HCEModule(schce.nn.Linear(5, 4))
    masks = hierarchy.R.astype(bool)  # hce-aware: each cell's acceptable labels are its label's subtree
    plan = HCETrainingPlan(
        module,
        hierarchy.R,
        loss=loss,
        normalize=False,
        class_weights=class_weights,
        target_masks=masks if loss == "hce-aware" else None,
        label_smoothing=label_smoothing,
    )
    return plan, hierarchy.R


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
@pytest.mark.parametrize("loss", ["hce-aware", "hce", "ce"])
@pytest.mark.parametrize("weighted", [False, True])
def test_label_smoothing_spreads_mass_over_the_labels_as_the_loss_reads_them(loss, weighted):
    weights = np.array([1.0, 2.0, 0.5, 3.0], dtype=np.float32) if weighted else None
    smooth, R = _tiny_plan(loss, 0.2, weights)
    plain, _ = _tiny_plan(loss, 0.0, weights)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 1, 3])
    batch = {"x": x, "y": y, "target": y}
    smooth.eval(), plain.eval()
    with torch.no_grad():
        got, base = smooth.training_step(batch, 0), plain.training_step(batch, 0)
        logits, _ = smooth.module(x, normalize=False)
    p = torch.softmax(logits.double(), dim=1).numpy()
    prob = p if loss == "ce" else p @ R.T.astype(np.float64)  # a label's subtree mass under the hierarchical losses
    per_cell = -np.log(prob).mean(axis=1)
    w = np.ones(len(y)) if weights is None else weights[y.numpy()]
    expected = 0.8 * base.item() + 0.2 * float((w * per_cell).sum() / w.sum())
    np.testing.assert_allclose(got.item(), expected, rtol=1e-5)
    assert abs(got.item() - base.item()) > 1e-3


def test_label_smoothing_trains_and_is_checked(registered):
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\)"):
        schce.HCEClassifier(registered, **SMALL_MLP).train(label_smoothing=1.0, enable_progress_bar=False)
    model = _train(registered, label_smoothing=0.1, max_epochs=1)
    plain = _train(registered, max_epochs=1)
    diff = max(
        (a - b).abs().max().item() for a, b in zip(model.module.parameters(), plain.module.parameters(), strict=True)
    )
    assert diff > 1e-5


# --- the monitored quantity -------------------------------------------------------------------------------------


def test_early_stopping_can_follow_the_validation_loss(registered):
    model = _train(registered, max_epochs=6, early_stopping_monitor="loss", early_stopping_patience=2)
    loss = model.history_["validation_loss"]["validation_loss"]
    assert model.best_epoch_ == int(loss.idxmin())
    # stopped 2 epochs after the lowest loss, or at max_epochs
    assert int(loss.index.max()) == min(model.best_epoch_ + 2, 5)
    with pytest.raises(
        ValueError, match=r"early_stopping_monitor must be one of \['f1', 'loss', 'weighted_loss', 'macro_loss'\]"
    ):
        schce.HCEClassifier(registered, **SMALL_MLP).train(early_stopping_monitor="auc", enable_progress_bar=False)


def _hce_monitored(registered, monitor: str):
    """An HCE model trained 3 epochs following ``monitor``, that monitor's history, and every validation cell's HCE
    loss at the kept epoch, computed independently in float64, with the cells' label codes and the training codes.
    """
    from schce.losses import hierarchical_log_probs

    model = schce.HCEClassifier(registered, loss="hce", **SMALL_MLP)
    model.train(max_epochs=3, early_stopping_monitor=monitor, seed=0, enable_progress_bar=False)
    history = model.history_[f"validation_{monitor}"][f"validation_{monitor}"]
    assert model.best_epoch_ == int(history.idxmin())
    codes = model.hierarchy.label_index(registered.obs["cell_type_ontology_term_id"].astype(str).tolist())
    val = registered[model.validation_indices_].copy()
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(val.X.todense() if hasattr(val.X, "todense") else val.X), dtype=torch.float32)
        logits, _ = model.module.eval()(x, normalize=model.setup_state.normalize)
    y = codes[model.validation_indices_]
    per_cell = -hierarchical_log_probs(logits.double(), torch.as_tensor(model.hierarchy.R))
    per_cell = per_cell.gather(1, torch.as_tensor(y)[:, None])[:, 0].numpy()
    return model, history.loc[model.best_epoch_], per_cell, y, codes[model.train_indices_]


def test_weighted_validation_loss_is_the_class_weighted_mean(registered):
    model, logged, per_cell, y, train_codes = _hce_monitored(registered, "weighted_loss")
    counts = np.bincount(train_codes, minlength=model.hierarchy.n_labels)
    w = (1.0 / counts)[y]  # balanced weights up to a factor, which cancels
    np.testing.assert_allclose(logged, (w * per_cell).sum() / w.sum(), rtol=1e-4)
    with pytest.raises(ValueError, match='weighted_loss" weighs the validation loss by the class weights'):
        model.train(early_stopping_monitor="weighted_loss", class_weights=None, enable_progress_bar=False)


def test_macro_validation_loss_is_the_mean_over_labels_of_their_mean_loss(registered):
    model, logged, per_cell, y, _ = _hce_monitored(registered, "macro_loss")
    # independently: each label's mean loss over its validation cells, then the plain mean over those labels
    per_label = [per_cell[y == c].mean() for c in np.unique(y)]
    np.testing.assert_allclose(logged, np.mean(per_label), rtol=1e-4)
    # it needs no class weights
    model.train(max_epochs=1, early_stopping_monitor="macro_loss", class_weights=None, enable_progress_bar=False)
    assert "validation_macro_loss" in model.history_


def test_the_default_follows_the_class_weighted_validation_loss(registered):
    model = _train(registered, max_epochs=5, early_stopping_patience=2)
    weighted = model.history_["validation_weighted_loss"]["validation_weighted_loss"]
    assert model.best_epoch_ == int(weighted.idxmin())
    # stopped 2 epochs after the lowest weighted loss, or at max_epochs
    assert int(weighted.index.max()) == min(model.best_epoch_ + 2, 4)
    # the defaults by recipe and class weights
    resolve = {"backbone": "mlp", "n_values": 1000}
    assert TrainConfig().resolve(recipe=None, **resolve).monitor == "validation_weighted_loss"
    assert TrainConfig(class_weights=None).resolve(recipe=None, **resolve).monitor == "validation_loss"
    assert TrainConfig().resolve(recipe="sctab", **resolve).monitor == PAPER_MONITOR
    assert TrainConfig(early_stopping_monitor="f1").resolve(recipe=None, **resolve).monitor == (
        "validation_corrected_macro_f1"
    )
    assert TrainConfig().resolve(recipe=None, **resolve).monitor_mode == "min"


def test_fine_tune_still_follows_the_validation_f1(registered):
    model = _train(registered, max_epochs=2)
    model.fine_tune(registered.copy(), "cell_type_ontology_term_id", max_epochs=3, enable_progress_bar=False)
    f1 = model.history_["validation_corrected_macro_f1"]["validation_corrected_macro_f1"]
    assert model.best_epoch_ == int(f1.idxmax())
