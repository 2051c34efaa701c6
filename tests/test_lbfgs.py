"""Full-batch L-BFGS for the linear backbone: when it is the default, what it refuses, and what it converges to."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import SMALL_MLP

import schce
from schce.nn import normalize_counts

LABELS_KEY = "cell_type_ontology_term_id"


def test_linear_trains_with_lbfgs_by_default_and_the_rest_with_adamw(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key=LABELS_KEY)
    lin = schce.HCEClassifier(pbmc_copy, backbone="linear")
    lin.train(seed=0, enable_progress_bar=False)
    assert lin.optimizer_ == "lbfgs" and lin.standardize
    # converged long before 100 epochs: early stopping on the training loss ended it, and the last epoch is kept
    losses = lin.history_["train_loss"]["train_loss"].to_numpy()
    assert len(losses) < 20 and lin.best_epoch_ == len(losses) - 1
    assert abs(losses[-1] - losses[-2]) < 1e-6 < losses[0] - losses[-1]
    assert "validation_corrected_macro_f1" in lin.history_  # validation is still measured, and calibrates
    assert lin.temperature_ != 1.0
    mlp = schce.HCEClassifier(pbmc_copy, **SMALL_MLP)
    mlp.train(max_epochs=1, seed=0, enable_progress_bar=False)
    assert mlp.optimizer_ == "adamw"
    minibatch = schce.HCEClassifier(pbmc_copy, backbone="linear")
    minibatch.train(max_epochs=1, batch_size=64, seed=0, enable_progress_bar=False)  # a batch size asks for AdamW
    assert minibatch.optimizer_ == "adamw"


def test_lbfgs_is_deterministic(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key=LABELS_KEY)
    weights = []
    for _ in range(2):
        model = schce.HCEClassifier(pbmc_copy, backbone="linear")
        model.train(seed=3, enable_progress_bar=False)
        weights.append(model.module.classifier.weight.detach().clone())
    torch.testing.assert_close(*weights, rtol=0, atol=0)  # bitwise: the same run twice in one process


def test_lbfgs_refuses_what_it_cannot_train_before_any_work(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key=LABELS_KEY)
    mlp = schce.HCEClassifier(pbmc_copy, **SMALL_MLP)
    with pytest.raises(ValueError, match="backbone='linear'"):
        mlp.train(optimizer="lbfgs")
    lin = schce.HCEClassifier(pbmc_copy, backbone="linear")
    with pytest.raises(ValueError, match="leave batch_size=None"):
        lin.train(optimizer="lbfgs", batch_size=64)
    with pytest.raises(ValueError, match="gradient_clip_val"):
        lin.train(optimizer="lbfgs", gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="turn off augment"):
        lin.train(optimizer="lbfgs", augment=np.zeros((2, pbmc_copy.n_vars), dtype=np.float32))
    with pytest.raises(ValueError, match="'adamw', 'lbfgs' or None"):
        lin.train(optimizer="sgd")
    with pytest.raises(ValueError, match="weight_decay must be non-negative"):
        lin.train(weight_decay=-1.0)
    assert not lin.is_trained_ and not mlp.is_trained_


def test_lbfgs_linear_ce_is_the_l2_penalised_logistic_regression(pbmc_copy):
    """Same optimum as scikit-learn's multinomial logistic regression on the model's own standardised inputs."""
    from sklearn.linear_model import LogisticRegression

    lam = 0.1
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key=LABELS_KEY)
    model = schce.HCEClassifier(pbmc_copy, backbone="linear", loss="ce")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.train(validation_size=0, class_weights=None, weight_decay=lam, seed=0, enable_progress_bar=False)
    # No validation cells is a choice here, so Lightning's note on the empty validation loader is not shown.
    assert not [w for w in seen if "across ranks is zero" in str(w.message)]
    assert model.optimizer_ == "lbfgs"
    module = model.module
    x = normalize_counts(torch.as_tensor(pbmc_copy.X.toarray(), dtype=torch.float32))
    z = ((x - module.input_mean) / module.input_scale).clamp(-10, 10).numpy().astype(np.float64)
    codes = model.hierarchy.label_index(pbmc_copy.obs[LABELS_KEY].astype(str))
    assert len(np.unique(codes)) == model.hierarchy.n_labels
    # ours: mean loss + λ/2 ‖W‖²; scikit-learn: C · Σ loss + 1/2 ‖W‖², so C = 1 / (λ n)
    reference = LogisticRegression(C=1 / (lam * len(codes)), tol=1e-10, max_iter=20_000).fit(z, codes)
    theirs = reference.predict_proba(z)
    with torch.no_grad():
        p = torch.softmax(module(torch.as_tensor(pbmc_copy.X.toarray(), dtype=torch.float32))[0], 1).numpy()
    assert np.abs(p - theirs).max() < 2e-3  # measured 3e-4
    np.testing.assert_allclose(module.classifier.weight.detach().numpy(), reference.coef_, atol=1e-3)  # 7e-5
    assert (p.argmax(1) == theirs.argmax(1)).mean() > 0.995


def test_an_interrupted_lbfgs_run_resumes_to_the_same_weights(pbmc_copy, tmp_path):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key=LABELS_KEY)
    whole = schce.HCEClassifier(pbmc_copy, backbone="linear")
    whole.train(seed=0, enable_progress_bar=False)
    cut = schce.HCEClassifier(pbmc_copy, backbone="linear")
    cut.train(seed=0, enable_progress_bar=False, checkpoint_dir=tmp_path, max_epochs=2)  # "interrupted" after 2
    resumed = schce.HCEClassifier(pbmc_copy, backbone="linear")
    resumed.train(seed=0, enable_progress_bar=False, checkpoint_dir=tmp_path, ckpt_path="last")
    assert bool((cut.module.classifier.weight != whole.module.classifier.weight).any())
    # Bitwise, one process: resuming restores the L-BFGS memory, so the run continues exactly as the uninterrupted one.
    torch.testing.assert_close(resumed.module.classifier.weight, whole.module.classifier.weight, rtol=0, atol=0)
    assert resumed.best_epoch_ == whole.best_epoch_ and resumed.temperature_ == whole.temperature_
    resumed.save(tmp_path / "model")
    loaded = schce.HCEClassifier.load(tmp_path / "model")
    assert (loaded.optimizer_, loaded.best_epoch_) == ("lbfgs", whole.best_epoch_)
