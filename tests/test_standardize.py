"""Per-gene standardisation of the model's inputs: fitted on the training cells, saved, applied to queries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _private import CLIP, gene_moments
from conftest import SMALL_MLP

import schce
from schce.nn import HCEModule, Linear, normalize_counts


def _dense(adata) -> np.ndarray:
    return adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)


def test_gene_moments_match_numpy_and_stop_at_max_cells():
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(300, 20)).astype(np.float32)
    x[:, 3] = 0  # a gene that never varies passes through unscaled
    batches = [{"x": torch.as_tensor(x[i : i + 64])} for i in range(0, 300, 64)]
    mean, std, n = gene_moments(batches, normalize=True)
    logged = normalize_counts(torch.as_tensor(x, dtype=torch.float64)).numpy()
    expected_std = logged.std(axis=0)
    expected_std[3] = 1.0
    assert n == 300
    np.testing.assert_allclose(mean.numpy(), logged.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-4)
    # an atlas estimate stops after the first batches that reach max_cells
    mean_head, _, n_head = gene_moments(batches, normalize=False, max_cells=100)
    assert n_head == 128
    np.testing.assert_allclose(mean_head.numpy(), x[:128].mean(axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="No cells"):
        gene_moments([], normalize=True)


def test_module_standardises_and_clips():
    module = HCEModule(Linear(3, 2))
    assert "input_mean" not in module.state_dict()  # scTab state dicts stay key for key
    module.set_input_scaling(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.01]))
    with torch.no_grad():
        module.classifier.weight.copy_(torch.eye(2, 3))
        module.classifier.bias.zero_()
        logits, _ = module(torch.tensor([[5.0, -3.0, 1.0]]), normalize=False)
    np.testing.assert_allclose(logits.numpy(), [[2.0, -3.0]])
    with torch.no_grad():
        module.classifier.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]))
        logits, _ = module(torch.tensor([[0.0, 0.0, 1.0]]), normalize=False)
    np.testing.assert_allclose(logits.numpy(), [[CLIP, -CLIP]])  # (1 - 0) / 0.01 = 100 is clipped


def test_training_fits_the_scaling_on_training_cells_only(pbmc_copy, tmp_path):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(pbmc_copy, **SMALL_MLP)
    model.train(max_epochs=2, seed=0, enable_progress_bar=False)
    logged = normalize_counts(torch.as_tensor(_dense(pbmc_copy)[model.train_indices_], dtype=torch.float64))
    np.testing.assert_allclose(model.module.input_mean.numpy(), logged.mean(0).numpy(), rtol=1e-4, atol=1e-6)
    # the scaling travels with the weights: a loaded model predicts the same probabilities
    before = model.predict(pbmc_copy, inplace=False)
    model.save(tmp_path / "m")
    loaded = schce.HCEClassifier.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.module.input_scale.numpy(), model.module.input_scale.numpy())
    after = loaded.predict(pbmc_copy, inplace=False)
    np.testing.assert_allclose(after["schce_confidence"], before["schce_confidence"], rtol=1e-5)
    assert (after["schce_prediction"] == before["schce_prediction"]).all()
    # training again continues from the fitted scaling rather than refitting it under the trained weights
    mean = model.module.input_mean.clone()
    model.train(max_epochs=1, seed=1, validation_size=0.3, enable_progress_bar=False)
    np.testing.assert_array_equal(model.module.input_mean.numpy(), mean.numpy())


def test_mlp_and_linear_standardise_by_default_tabnet_and_sctab_do_not(pbmc_copy):
    schce.HCEClassifier.setup_anndata(pbmc_copy, labels_key="cell_type_ontology_term_id")
    assert schce.HCEClassifier(pbmc_copy, backbone="linear").standardize
    for kwargs in (
        {"standardize": False, **SMALL_MLP},
        {"recipe": "sctab"},
        {"backbone": "linear", "recipe": "sctab"},
        {"backbone": "tabnet"},
    ):
        model = schce.HCEClassifier(pbmc_copy, **kwargs)
        model.train(max_epochs=1, seed=0, enable_progress_bar=False)
        assert not hasattr(model.module, "input_mean"), kwargs


def test_mlp_input_dropout_zeroes_genes_in_training_only_and_keeps_sctab_keys():
    from schce.nn import MLP

    torch.manual_seed(0)
    plain, dropped = MLP(50, 4), MLP(50, 4, input_dropout=0.5)
    assert list(plain.state_dict()) == list(dropped.state_dict())
    x = torch.ones(200, 50)
    dropped.train()
    seen = dropped.input_dropout(x)
    assert 0.4 < (seen == 0).float().mean() < 0.6
    np.testing.assert_allclose(seen[seen != 0].numpy(), 2.0)  # survivors are rescaled by 1 / (1 - p)
    dropped.load_state_dict(plain.state_dict())
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))  # no effect at inference
