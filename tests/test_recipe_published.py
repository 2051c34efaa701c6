"""``recipe="sctab"`` is the published training: one step checked against an independent implementation.

The independent side is written from the published formulas (theislab/scTab ``cellnet/models.py``, the HCE paper):
log-normalised inputs, scTab's augmentation (a random row of the matrix with a Bernoulli sign, clamped to [0, 9]),
``nll_loss(log(softmax(logits) @ child.T + 1e-6), y, weight)`` with scikit-learn's balanced class weights (minus
λ_sparse · M_loss for TabNet), gradient-norm clipping at 1.0, AdamW and StepLR(step 1, γ 0.9).
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _private import PAPER_MONITOR, TrainConfig, published_augmentation_candidates
from sklearn.metrics import f1_score
from sklearn.utils.class_weight import compute_class_weight

import schce
from schce.nn import densify

# The published optimiser settings per backbone (lr, weight decay), written out independently of schce.train.RECIPES.
PUBLISHED = {"linear": (5e-4, 0.01), "mlp": (2e-3, 0.05), "tabnet": (5e-3, 0.05)}


@pytest.fixture(scope="module")
def atlas():
    adata = schce.datasets.simulate_atlas(
        360, n_genes=48, n_cell_types=5, n_datasets=4, n_donors=12, library_size=300, seed=2, progress=False
    )
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id", batch_key="tech_sample")
    return adata


@pytest.fixture(scope="module")
def onto():
    return schce.load_cell_ontology()


class Probe(pl.Callback):
    """Records the first training step: weights, random state and batch before it, loss and gradients, weights after."""

    def __init__(self):
        self.first: dict = {}
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.first:
            self.first = {
                "state": copy.deepcopy(pl_module.module.state_dict()),
                "rng": torch.get_rng_state(),
                # the input as the model sees it (loaders may hand over CSR parts), and the labels
                "batch": {"x": densify(batch).clone(), "y": batch["y"].clone()},
                "augmentations": None if pl_module.augmentations is None else pl_module.augmentations.clone(),
                "class_weights": pl_module.class_weights.clone(),
            }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if "grads" not in self.first:  # before Lightning clips them
            self.first["grads"] = {n: p.grad.clone() for n, p in pl_module.module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "loss" not in self.first:
            self.first["loss"] = outputs["loss"].detach().clone()
            self.first["after"] = {n: p.detach().clone() for n, p in pl_module.module.named_parameters()}


def _child_matrix(model, onto) -> torch.Tensor:
    """scTab's ``child_matrix``: ``[i, j] = 1`` iff label ``j`` is label ``i`` or one of its descendants in CL."""
    labels = model.hierarchy.labels
    return torch.tensor(
        [[float(b in onto.descendants(a, include_self=True)) for b in labels] for a in labels], dtype=torch.float32
    )


def _balanced_weights(model, adata) -> torch.Tensor:
    """scikit-learn's ``compute_class_weight("balanced")`` over the training cells (0 for labels without cells)."""
    codes = model.hierarchy.label_index(adata.obs["cell_type_ontology_term_id"].astype(str))[model.train_indices_]
    present = np.unique(codes)
    weights = np.zeros(model.hierarchy.n_labels)
    weights[present] = compute_class_weight("balanced", classes=present, y=codes)
    return torch.tensor(weights, dtype=torch.float32)


def _published_step(module, first, child, weights, backbone):
    """The published training step on ``module`` (weights of ``first``): returns the loss; gradients are left set."""
    module.load_state_dict(first["state"])
    module.train()
    torch.set_rng_state(first["rng"])
    x, y = first["batch"]["x"], first["batch"]["y"]
    x = torch.log1p(x / x.sum(1, keepdim=True) * 1e4)  # the store's sf-log1p values
    aug = first["augmentations"]
    if aug is not None:  # scTab's _augment_data
        rows = aug[torch.randint(0, aug.shape[0], (x.shape[0],))]
        sign = 2.0 * (torch.bernoulli(0.5 * torch.ones(x.shape[0], 1)) - 0.5)
        x = torch.clamp(x + sign * rows, min=0.0, max=9.0)
    logits, _ = module(x, normalize=False)
    loss = F.nll_loss(torch.log(torch.softmax(logits, dim=1) @ child.T + 1e-6), y, weight=weights)
    if backbone == "tabnet":
        loss = loss - 1e-5 * module.classifier.sparsity_loss
    module.zero_grad()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("backbone", ["linear", "mlp", "tabnet"])
def test_sctab_recipe_matches_the_published_training_step(atlas, onto, backbone):
    kwargs = {"n_d": 16, "n_a": 8} if backbone == "tabnet" else {}
    model = schce.HCEClassifier(atlas, backbone=backbone, recipe="sctab", **kwargs)
    assert (model.loss, model.hce_form, model.standardize) == ("hce", "reference", False)
    probe = Probe()
    model.train(
        max_epochs=3, split_key="donor_id", seed=0, enable_progress_bar=False, limit_train_batches=1, callbacks=[probe]
    )
    first = probe.first
    # augmentation: on for the MLP and TabNet (scTab's construction on the training cells), off for the linear model
    assert (first["augmentations"] is not None) == (backbone != "linear")
    if first["augmentations"] is not None:
        train = model.train_indices_
        codes = model.hierarchy.label_index(atlas.obs["cell_type_ontology_term_id"].astype(str))
        expected, _ = published_augmentation_candidates(
            # grouped by the registered batch (tech_sample), as scTab groups by tech_sample
            atlas.X[train],
            codes[train],
            atlas.obs["_scvi_batch"].to_numpy()[train],
            normalize=True,
            seed=0,
        )
        torch.testing.assert_close(first["augmentations"], torch.from_numpy(expected))
    # the loss and its gradients
    independent = copy.deepcopy(model.module)
    child, weights = _child_matrix(model, onto), _balanced_weights(model, atlas)
    loss = _published_step(independent, first, child, weights, backbone)
    torch.testing.assert_close(first["loss"], loss, rtol=1e-5, atol=1e-6)
    params = dict(independent.named_parameters())
    assert set(params) == set(first["grads"])
    for name, p in params.items():
        torch.testing.assert_close(
            first["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    # the update: gradient norm clipped at 1.0, then AdamW with the published lr and weight decay
    lr, weight_decay = PUBLISHED[backbone]
    torch.nn.utils.clip_grad_norm_(independent.parameters(), 1.0)
    torch.optim.AdamW(independent.parameters(), lr=lr, weight_decay=weight_decay).step()
    for name, p in params.items():
        # AdamW's first step moves an entry by about lr · sign(gradient): where the gradient is rounding noise (a
        # bias before a batch norm), only the size of the step is determined.
        tiny = first["grads"][name].abs() < 1e-5
        after, expected = first["after"][name], p.detach()
        torch.testing.assert_close(after[~tiny], expected[~tiny], rtol=1e-4, atol=1e-6, msg=name)
        assert ((after - expected)[tiny].abs() <= 2.01 * lr).all(), name
    # StepLR(step 1, γ 0.9) after every epoch
    np.testing.assert_allclose(probe.lrs, [lr, lr * 0.9, lr * 0.81], rtol=1e-12)


@pytest.mark.parametrize("backbone", ["linear", "tabnet"])
def test_sctab_recipe_validates_and_selects_as_published(atlas, onto, backbone):
    kwargs = {"n_d": 16, "n_a": 8} if backbone == "tabnet" else {}
    model = schce.HCEClassifier(atlas, backbone=backbone, recipe="sctab", **kwargs)
    model.train(max_epochs=3, split_key="donor_id", seed=0, enable_progress_bar=False, calibrate=False)
    # the donor split, 70 / 15 / 15: whole donors, about 15% of the cells in validation and in test
    donors = atlas.obs["donor_id"].astype(str).to_numpy()
    parts = [model.train_indices_, model.validation_indices_, model.test_indices_]
    assert sum(map(len, parts)) == atlas.n_obs
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert not set(donors[a]) & set(donors[b])
    for part in parts[1:]:
        assert 0.15 <= len(part) / atlas.n_obs < 0.35
    # model selection on the paper's macro F1 (labels true or predicted), weights of the best epoch kept
    history = model.history_[PAPER_MONITOR][PAPER_MONITOR]
    assert model.best_epoch_ == int(history.idxmax())
    # recompute the kept epoch's validation numbers from the kept weights
    val = model.validation_indices_
    x = torch.from_numpy(np.asarray(atlas.X[val].toarray(), dtype=np.float32))
    y = torch.from_numpy(model.hierarchy.label_index(atlas.obs["cell_type_ontology_term_id"].astype(str))[val])
    with torch.no_grad():
        logits, _ = model.module(torch.log1p(x / x.sum(1, keepdim=True) * 1e4), normalize=False)
    pred = logits.argmax(1)
    child = _child_matrix(model, onto)
    ok = child[y, pred] > 0
    corrected_targets = torch.where(ok, pred, y)  # scTab's hierarchy_correct
    corrected_pred = torch.where(ok, y, pred)
    loss = F.nll_loss(torch.log(torch.softmax(logits, 1) @ child.T + 1e-6), corrected_targets)  # unweighted
    if backbone == "tabnet":  # the HCE paper's validation loss keeps - λ_sparse · M_loss (one validation batch)
        loss = loss - 1e-5 * model.module.classifier.sparsity_loss
    np.testing.assert_allclose(model.history_["validation_loss"].loc[model.best_epoch_].iloc[0], loss, rtol=1e-5)
    union = np.union1d(y.numpy(), corrected_pred.numpy())
    f1 = f1_score(y.numpy(), corrected_pred.numpy(), labels=union, average="macro", zero_division=0)
    np.testing.assert_allclose(history.loc[model.best_epoch_], f1, rtol=1e-6)


def test_sctab_recipe_defaults_and_overrides(atlas, tmp_path):
    config = TrainConfig().resolve("mlp", "sctab", None)
    assert (config.max_epochs, config.lr_gamma, config.monitor) == (50, 0.9, PAPER_MONITOR)
    assert config.trainer_kwargs["gradient_clip_val"] == 1.0
    assert TrainConfig().resolve("mlp", None, None).max_epochs == 100
    assert TrainConfig(max_epochs=7).resolve("mlp", "sctab", None).max_epochs == 7
    ce = schce.HCEClassifier(atlas, backbone="linear", recipe="sctab", loss="ce")
    assert ce.loss == "ce"
    with pytest.raises(ValueError, match="trains the published losses"):
        schce.HCEClassifier(atlas, recipe="sctab", loss="hce-aware")
    plain = schce.HCEClassifier(atlas, backbone="linear")
    assert (plain.loss, plain.hce_form) == ("hce-aware", "log")
    # a 10% random split without a donor column; no augmentation without a batch key or split key
    model = schce.HCEClassifier(atlas, backbone="linear", recipe="sctab")
    model.train(max_epochs=1, seed=0, enable_progress_bar=False, calibrate=False)
    assert len(model.test_indices_) == 0 and 0.05 < len(model.validation_indices_) / atlas.n_obs < 0.2
    # the resolved loss is saved: a loaded recipe model keeps the published loss
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m", accelerator="cpu")
    assert (loaded.recipe, loaded.loss, loaded.hce_form) == ("sctab", "hce", "reference")


def test_store_recipe_uses_the_stores_weights_and_augmentations(atlas, tmp_path):
    store = schce.data.write_sctab_store(atlas, tmp_path / "store", split_key="donor_id", rows_per_part=2048)
    own = schce.HCEClassifier.from_sctab_store(store)
    assert own.recipe is None and own.standardize  # schce's own model unless the recipe is asked for
    model = schce.HCEClassifier.from_sctab_store(store, backbone="tabnet", recipe="sctab", n_d=8, n_a=8)
    assert (model.recipe, model.loss, model.hce_form, model.standardize) == ("sctab", "hce", "reference", False)
    with pytest.raises(ValueError, match="published losses"):
        schce.HCEClassifier.from_sctab_store(store, recipe="sctab", loss="hce-aware")
    probe = Probe()
    dm = schce.data.SCTabStoreDataModule(store, batch_size=64, num_workers=0, seed=0)
    model.train(datamodule=dm, max_epochs=2, enable_progress_bar=False, limit_train_batches=1, callbacks=[probe])
    np.testing.assert_array_equal(probe.first["augmentations"].numpy(), np.load(store / "augmentations.npy"))
    np.testing.assert_allclose(probe.first["class_weights"].numpy(), np.load(store / "class_weights.npy"), rtol=1e-6)
    np.testing.assert_allclose(probe.lrs, [5e-3, 5e-3 * 0.9], rtol=1e-12)
    assert PAPER_MONITOR in model.history_


def test_sctab_recipe_warns_when_it_cannot_augment(atlas):
    adata = atlas.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")  # no batch key
    model = schce.HCEClassifier(adata, recipe="sctab", n_layers=2, n_hidden=16)
    with pytest.warns(UserWarning, match="no batch_key was registered and no split_key given"):
        model.train(max_epochs=1, seed=0, enable_progress_bar=False, calibrate=False)
    assert model.is_trained_
