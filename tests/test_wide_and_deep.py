"""The MLP's wide & deep option: a linear map of the input genes added to the deep part's logits."""

from __future__ import annotations

import numpy as np
import torch
from conftest import SMALL_MLP

import schce
from schce.nn import MLP, HCEModule, extend_head

LABELS = "cell_type_ontology_term_id"


def test_wide_logits_are_added_to_the_deep_ones_and_read_the_input_before_dropout():
    torch.manual_seed(0)
    net = MLP(20, 4, n_hidden=8, n_layers=1, input_dropout=0.5, wide=True)
    module = HCEModule(net)
    x = torch.rand(16, 20) * 3
    assert list(net.state_dict())[-2:] == ["wide.weight", "wide.bias"]
    assert MLP(20, 4, n_hidden=8, n_layers=1).wide is None  # off by default: scTab's MLP, its state dict
    net.eval()
    logits, h = module(x, normalize=False)
    torch.testing.assert_close(logits, net.linear(net.encoder(x)) + x @ net.wide.weight.T + net.wide.bias)
    torch.testing.assert_close(net(x), logits)
    # In training, the input dropout zeroes genes of the deep part only; in place, the wide part still reads x intact.
    net.train()
    buffer = x.clone()
    torch.manual_seed(1)
    logits, h = module(buffer, normalize=False, inplace=True)
    assert (buffer == 0).sum() > (x == 0).sum() + 20  # the dropout zeroed genes in the buffer ...
    torch.manual_seed(1)
    dropped = net.input_dropout(x.clone())
    deep = net.linear(net.encoder(dropped))
    torch.testing.assert_close(logits, deep + net.wide(x), rtol=1e-5, atol=1e-5)  # ... after the wide part read it


def test_extend_head_grows_the_wide_part_and_keeps_the_old_logits():
    torch.manual_seed(0)
    net = HCEModule(MLP(20, 5, n_hidden=8, n_layers=2, wide=True)).eval()
    x = torch.rand(16, 20) * 10
    before, _ = net(x, normalize=False)
    extend_head(net.classifier, 3)
    after, _ = net(x, normalize=False)
    assert after.shape == (16, 8) and net.classifier.wide.weight.shape == (8, 20)
    torch.testing.assert_close(after[:, :5], before, rtol=1e-5, atol=1e-5)


def test_classifier_trains_saves_and_loads_a_wide_mlp(pbmc, tmp_path):
    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key=LABELS)
    model = schce.HCEClassifier(adata, wide=True, **SMALL_MLP)
    model.train(max_epochs=3, seed=0, enable_progress_bar=False)
    assert model.module.classifier.wide.out_features == model.hierarchy.n_labels
    query = pbmc.copy()
    model.predict(query)
    model.save(tmp_path / "wide")
    loaded = schce.HCEClassifier.load(tmp_path / "wide")
    assert loaded.module.classifier.wide is not None
    again = pbmc.copy()
    loaded.predict(again)
    np.testing.assert_allclose(
        again.obsm["schce_probabilities"].to_numpy(), query.obsm["schce_probabilities"].to_numpy(), rtol=1e-5, atol=1e-6
    )
