"""TabNet backbone: scTab state-dict compatibility, sparse mappings, ghost batch norm and training behaviour."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from _private import BACKBONES, DEFAULT_BACKBONE_KWARGS, GhostBatchNorm, entmax15, sparsemax
from conftest import shared_path

from schce.nn import MLP, HCEModule, Linear, TabNet, make_backbone

N_GENES, N_LABELS = 19331, 164
SMALL = {"n_d": 8, "n_a": 8, "virtual_batch_size": 16}


# --------------------------------------------------------------------------------------------------------------
# Reference checkpoint layout
# --------------------------------------------------------------------------------------------------------------


def _parse_reference() -> dict[str, dict]:
    """``{section: {"n_params": int, "n_entries": int, "keys": [(key, shape), ...]}}`` from the reference file."""
    reference = shared_path("reference", "sctab_checkpoint_keys.txt")
    sections: dict[str, dict] = {}
    current = None
    header = re.compile(r"^## (\w+) .*?: (\d+) parameters, (\d+) state_dict entries")
    for line in reference.read_text().splitlines():
        if match := header.match(line):
            current = {"n_params": int(match[2]), "n_entries": int(match[3]), "keys": []}
            sections[match[1]] = current
        elif current is not None and (match := re.match(r"^(\S+) \(([\d, ]*)\)$", line.strip())):
            shape = tuple(int(s) for s in match[2].replace(" ", "").split(",") if s)
            current["keys"].append((match[1], shape))
    return sections


def _layout(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in module.state_dict().items()]


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The models here are tiny: one intra-op thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    return _parse_reference()


@pytest.fixture(scope="module")
def sctab_tabnet() -> TabNet:
    with torch.device("meta"):
        return TabNet(N_GENES, N_LABELS)


def test_tabnet_matches_sctab_checkpoint(reference, sctab_tabnet):
    ref = reference["TabNet"]
    n = _n_params(sctab_tabnet)
    print(f"TabNet({N_GENES}, {N_LABELS}) parameters: {n:,}")
    assert n == 9_655_628 == ref["n_params"]
    layout = _layout(sctab_tabnet)
    assert len(layout) == ref["n_entries"] == len(ref["keys"]) == 114
    assert dict(layout) == dict(ref["keys"])
    assert layout == ref["keys"]  # same order as well
    assert sctab_tabnet.n_latent == 128


def test_shared_linears_are_one_parameter_per_layer(sctab_tabnet):
    enc = sctab_tabnet.encoder
    for i in range(3):
        w = enc.initial_splitter.shared.shared_layers[i].weight
        assert w is enc.initial_splitter.shared.glu_layers[i].fc.weight
        assert w is enc.feat_transformers[0].shared.shared_layers[i].weight
        assert w is enc.feat_transformers[0].shared.glu_layers[i].fc.weight
    # specific blocks are not shared
    specific = enc.feat_transformers[0].specifics.glu_layers[0].fc.weight
    assert enc.initial_splitter.specifics.glu_layers[0].fc.weight is not specific


@pytest.mark.parametrize(
    ("name", "factory", "expected"),
    [
        ("Linear", lambda: Linear(N_GENES, N_LABELS), 3_170_448),
        ("MLP", lambda: MLP(N_GENES, N_LABELS, n_hidden=128, n_layers=8, dropout=0.1), 2_613_284),
    ],
)
def test_linear_and_mlp_match_sctab_checkpoint(reference, name, factory, expected):
    ref = reference[name]
    with torch.device("meta"):
        model = factory()
    n = _n_params(model)
    print(f"{name} parameters: {n:,}")
    assert n == expected == ref["n_params"]
    layout = _layout(model)
    assert len(layout) == ref["n_entries"]
    assert dict(layout) == dict(ref["keys"])


def test_make_backbone_tabnet():
    assert BACKBONES["tabnet"] is TabNet
    model = make_backbone("tabnet", 30, 5, **SMALL)
    assert isinstance(model, TabNet)
    assert model.n_latent == 8
    assert model.lambda_sparse == 1e-5
    assert model.final_mapping.weight.shape == (5, 8)


# --------------------------------------------------------------------------------------------------------------
# sparsemax / entmax15
# --------------------------------------------------------------------------------------------------------------


def _entmax15_bisection(z: torch.Tensor) -> torch.Tensor:
    """Reference 1.5-entmax of a 1-D float64 vector: bisection for tau in sum(relu(z/2 - tau)^2) = 1."""
    u = z / 2
    lo, hi = (u.max() - 1).item(), u.max().item()
    for _ in range(200):
        tau = (lo + hi) / 2
        if torch.clamp(u - tau, min=0).pow(2).sum() > 1:
            lo = tau
        else:
            hi = tau
    return torch.clamp(u - (lo + hi) / 2, min=0).pow(2)


def test_sparsemax_hand_examples():
    torch.testing.assert_close(sparsemax(torch.tensor([1.0, 0.0])), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(sparsemax(torch.tensor([0.5, 0.4])), torch.tensor([0.55, 0.45]))
    torch.testing.assert_close(sparsemax(torch.tensor([2.0, 1.0, 0.1])), torch.tensor([1.0, 0.0, 0.0]))
    # all three in the support: tau = (0.6 - 1) / 3
    tau = -0.4 / 3
    expected = torch.tensor([0.3 - tau, 0.2 - tau, 0.1 - tau], dtype=torch.float64)
    torch.testing.assert_close(sparsemax(torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)), expected)
    torch.testing.assert_close(sparsemax(torch.zeros(4)), torch.full((4,), 0.25))


def test_entmax15_hand_examples():
    # z = [1, 0]: halves [0.5, 0]; both in the support, (0.5 - tau)^2 + tau^2 = 1 gives tau = (1 - sqrt 7) / 4,
    # so p = [(4 + sqrt 7) / 8, (4 - sqrt 7) / 8].
    s7 = math.sqrt(7)
    expected = torch.tensor([(4 + s7) / 8, (4 - s7) / 8], dtype=torch.float64)
    torch.testing.assert_close(entmax15(torch.tensor([1.0, 0.0], dtype=torch.float64)), expected)
    # z = [3, 0]: tau = 0.5 already gives p_1 = 1 and 0 / 2 - 0.5 < 0, so the second entry is exactly zero.
    torch.testing.assert_close(entmax15(torch.tensor([3.0, 0.0])), torch.tensor([1.0, 0.0]))
    # ties: uniform
    torch.testing.assert_close(entmax15(torch.zeros(3)), torch.full((3,), 1 / 3))
    # shift invariance
    z = torch.tensor([0.3, -1.2, 2.0, 0.7])
    torch.testing.assert_close(entmax15(z), entmax15(z + 100.0))


@pytest.mark.parametrize("fn", [sparsemax, entmax15], ids=["sparsemax", "entmax15"])
def test_sparse_mappings_are_probability_vectors(fn):
    gen = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(32, 20, generator=gen)
    p = fn(z)
    assert p.shape == z.shape
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=-1), torch.ones(32))
    # order preserving: the largest score gets the largest probability
    assert (p.argmax(dim=-1) == z.argmax(dim=-1)).all()
    # peaked inputs give sparse outputs
    peaked = torch.zeros(5, 10)
    peaked[:, 3] = 10.0
    q = fn(peaked)
    torch.testing.assert_close(q, F.one_hot(torch.full((5,), 3), 10).float(), rtol=0, atol=1e-6)
    assert ((p == 0).sum(dim=-1) > 0).all()  # scale-3 Gaussian scores over 20 entries: every row has zeros
    # other dimensions
    torch.testing.assert_close(fn(z.T, dim=0), p.T)
    z3 = torch.randn(2, 3, 6, generator=gen)
    torch.testing.assert_close(fn(z3, dim=1), fn(z3.transpose(1, 2), dim=-1).transpose(1, 2))


def test_entmax15_matches_bisection():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        z = 2 * torch.randn(9, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(entmax15(z), _entmax15_bisection(z), atol=1e-10, rtol=0)


@pytest.mark.parametrize("fn", [sparsemax, entmax15], ids=["sparsemax", "entmax15"])
def test_sparse_mappings_gradcheck(fn):
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert (fn(z) == 0).any()  # the check covers rows with a partial support
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=-1), (z,), eps=1e-6, atol=1e-5)
    zt = z.detach().T.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn(t, dim=0), (zt,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Ghost batch norm
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "vbs", "chunk"), [(64, 16, 16), (40, 16, 20), (10, 16, 10)])
def test_ghost_batch_norm_training_is_per_chunk(batch, vbs, chunk):
    torch.manual_seed(3)
    gbn = GhostBatchNorm(5, virtual_batch_size=vbs, momentum=0.02)
    with torch.no_grad():
        gbn.bn.weight.uniform_(0.5, 1.5)
        gbn.bn.bias.uniform_(-1, 1)
    ref = torch.nn.BatchNorm1d(5, momentum=0.02)
    ref.load_state_dict(gbn.bn.state_dict())
    x = 2 * torch.randn(batch, 5) + 1
    out = gbn.train()(x)
    expected = torch.cat([ref.train()(x[i : i + chunk]) for i in range(0, batch, chunk)])
    torch.testing.assert_close(out, expected)
    # each chunk is normalised with its own statistics
    first = out[:chunk]
    torch.testing.assert_close(
        (first - gbn.bn.bias) / gbn.bn.weight, F.batch_norm(x[:chunk], None, None, training=True), atol=1e-5, rtol=0
    )
    # running statistics updated once per chunk, exactly as the reference
    torch.testing.assert_close(gbn.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(gbn.bn.running_var, ref.running_var)
    assert int(gbn.bn.num_batches_tracked) == batch // chunk


def test_ghost_batch_norm_eval_uses_running_stats():
    torch.manual_seed(4)
    gbn = GhostBatchNorm(5, virtual_batch_size=8)
    for _ in range(5):
        gbn.train()(torch.randn(32, 5) * 3 + 2)
    gbn.eval()
    x = torch.randn(50, 5)
    expected = (x - gbn.bn.running_mean) / torch.sqrt(gbn.bn.running_var + gbn.bn.eps) * gbn.bn.weight + gbn.bn.bias
    torch.testing.assert_close(gbn(x), expected)
    # row-wise: independent of the batch it sits in
    torch.testing.assert_close(gbn(x[:3]), gbn(x)[:3])


# --------------------------------------------------------------------------------------------------------------
# Small model behaviour
# --------------------------------------------------------------------------------------------------------------


def _toy_data(n: int = 64, n_input: int = 50, n_labels: int = 7, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_labels
    centres = 3 * torch.randn(n_labels, n_input, generator=gen)
    x = centres[y] + 0.5 * torch.randn(n, n_input, generator=gen)
    return x, y


def test_forward_shapes_gradients_and_sparsity():
    torch.manual_seed(6)
    model = TabNet(50, 7, **SMALL)
    x, y = _toy_data()
    model.train()
    logits = model(x)
    assert logits.shape == (64, 7)
    h = model.embed(x)
    assert h.shape == (64, 8) and model.n_latent == 8
    assert (h >= 0).all()  # sum of ReLU'd decisions
    assert torch.isfinite(logits).all() and torch.isfinite(h).all()
    torch.testing.assert_close(model.classify(h), h @ model.final_mapping.weight.T)
    # sparsity term: negative entropy of the masks, between -log(n_input) and 0, with a graph in training mode
    s = model.sparsity_loss
    assert s is not None and s.requires_grad and torch.isfinite(s)
    assert -math.log(50) - 1e-4 <= s.item() <= 0.0
    loss = F.cross_entropy(logits, y) - model.lambda_sparse * s
    loss.backward()
    first = model.encoder.initial_splitter.shared.shared_layers[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert model.encoder.initial_bn.weight.grad.abs().sum() > 0
    assert model.encoder.att_transformers[0].fc.weight.grad.abs().sum() > 0


def test_sparsity_loss_is_tabnets_m_loss():
    torch.manual_seed(7)
    for mask_type in ("entmax", "sparsemax"):
        model = TabNet(50, 7, n_steps=2, mask_type=mask_type, **SMALL)
        x, _ = _toy_data()
        model.train()
        model(x)  # populate the running statistics
        model.eval()
        model(x)
        _, masks, _ = model.encoder(x)
        assert len(masks) == 2
        for m in masks:
            assert m.shape == (64, 50) and (m >= 0).all()
            torch.testing.assert_close(m.sum(dim=1), torch.ones(64))
        expected = sum((m * torch.log(m + 1e-15)).sum(dim=1).mean() for m in masks) / 2
        torch.testing.assert_close(model.sparsity_loss, expected)
        assert not model.sparsity_loss.requires_grad  # detached in eval mode
        assert model.sparsity_loss.item() <= 0.0
        explained = model.explain(x)
        torch.testing.assert_close(explained, masks[0] + masks[1])
        torch.testing.assert_close(explained.sum(dim=1), torch.full((64,), 2.0))
        assert model.explain(x, weighted=True).shape == (64, 50)


def test_training_reduces_cross_entropy():
    torch.manual_seed(8)
    model = TabNet(50, 7, **SMALL)
    x, y = _toy_data(n=128)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        (ce - model.lambda_sparse * model.sparsity_loss).backward()
        opt.step()
        losses.append(ce.item())
    assert losses[-1] < 0.3 * losses[0]
    model.eval()
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy > 0.9


def test_eval_deterministic_and_state_dict_round_trip():
    torch.manual_seed(9)
    model = TabNet(50, 7, **SMALL)
    x, y = _toy_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out1, out2 = model(x), model(x)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)  # the same computation twice in one process
    # batch composition does not matter in eval mode
    torch.testing.assert_close(model(x[:5]), out1[:5])

    torch.manual_seed(10)
    fresh = TabNet(50, 7, **SMALL)
    assert not torch.allclose(fresh.final_mapping.weight, model.final_mapping.weight)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), out1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fresh.embed(x), model.embed(x), rtol=1e-6, atol=1e-6)
    # tying survives loading
    enc = fresh.encoder
    tied = enc.feat_transformers[0].shared.glu_layers[0].fc.weight
    assert enc.initial_splitter.shared.shared_layers[0].weight is tied


def test_hce_module_wraps_tabnet():
    torch.manual_seed(11)
    module = HCEModule(TabNet(50, 7, **SMALL)).eval()
    counts = torch.poisson(torch.full((20, 50), 3.0))
    logits, h = module(counts)
    assert logits.shape == (20, 7) and h.shape == (20, 8)
    assert module.n_latent == 8


def test_initialisation_scales():
    torch.manual_seed(12)
    model = TabNet(400, 7, n_d=64, n_a=32)
    w_glu = model.encoder.initial_splitter.shared.shared_layers[0].weight  # fan_in 400: std sqrt(2 / 20)
    w_att = model.encoder.att_transformers[0].fc.weight  # fan_in 32: std sqrt(1 / sqrt(32))
    assert w_glu.std().item() == pytest.approx(math.sqrt(2 / 20), rel=0.05)
    assert w_att.std().item() == pytest.approx(math.sqrt(1 / math.sqrt(32)), rel=0.05)


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="mask_type"):
        TabNet(10, 3, mask_type="softmax")
    with pytest.raises(ValueError, match="n_steps"):
        TabNet(10, 3, n_steps=0)
    with pytest.raises(ValueError, match="not both zero"):
        TabNet(10, 3, n_independent=0, n_shared=0)


@pytest.mark.parametrize(("n_independent", "n_shared"), [(0, 2), (2, 0)])
def test_without_shared_or_independent_layers(n_independent, n_shared):
    torch.manual_seed(13)
    model = TabNet(20, 3, n_d=4, n_a=4, n_steps=2, n_independent=n_independent, n_shared=n_shared)
    x = torch.randn(32, 20)
    assert model(x).shape == (32, 3)
    keys = model.state_dict().keys()
    assert any(".shared.shared_layers." in k for k in keys) == (n_shared > 0)
    assert any(".specifics." in k for k in keys) == (n_independent > 0)


def test_initial_bn_eps_is_a_variance_floor_that_keeps_the_state_dict():
    sctab = TabNet(10, 3, n_d=4, n_a=4)
    assert sctab.encoder.initial_bn.eps == 1e-5  # scTab's (PyTorch's default)
    ours = TabNet(10, 3, n_d=4, n_a=4, initial_bn_eps=1.0)
    assert list(ours.state_dict()) == list(sctab.state_dict())
    seen = {}
    ours.encoder.initial_bn.register_forward_hook(lambda m, i, o: seen.update(out=o))
    sctab.encoder.initial_bn.register_forward_hook(lambda m, i, o: seen.update(ref=o))
    for model in (ours, sctab):
        model.eval()
        # a gene that was silent in training (variance 0) and is expressed at log level 3 in a query cell
        model.encoder.initial_bn.running_mean.zero_()
        model.encoder.initial_bn.running_var.zero_()
        model(torch.full((2, 10), 3.0))
    torch.testing.assert_close(seen["out"], torch.full((2, 10), 3.0))  # 3 / sqrt(0 + 1)
    assert seen["ref"].min().item() > 900  # 3 / sqrt(1e-5): far outside anything a training batch produces
    with pytest.raises(ValueError, match="initial_bn_eps"):
        TabNet(10, 3, initial_bn_eps=0)


def test_package_default_tabnet_floors_the_input_variance(pbmc):
    from _private import DEFAULT_BACKBONE_KWARGS

    import schce

    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    assert DEFAULT_BACKBONE_KWARGS["tabnet"] == {"initial_bn_eps": 1.0}
    eps = lambda model: model.module.classifier.encoder.initial_bn.eps
    assert eps(schce.HCEClassifier(adata, backbone="tabnet", n_d=8, n_a=8)) == 1.0
    assert eps(schce.HCEClassifier(adata, backbone="tabnet", recipe="sctab", n_d=8, n_a=8)) == 1e-5
    assert eps(schce.HCEClassifier(adata, backbone="tabnet", n_d=8, n_a=8, initial_bn_eps=1e-3)) == 1e-3


def test_saved_model_keeps_its_backbone_defaults(pbmc, tmp_path, monkeypatch):
    import schce

    adata = pbmc.copy()
    schce.HCEClassifier.setup_anndata(adata, labels_key="cell_type_ontology_term_id")
    model = schce.HCEClassifier(adata, backbone="tabnet", n_d=8, n_a=8)
    model.train(max_epochs=1, seed=0, enable_progress_bar=False)
    model.save(tmp_path / "m")
    monkeypatch.setitem(DEFAULT_BACKBONE_KWARGS, "tabnet", {"initial_bn_eps": 0.5})
    loaded = schce.HCEClassifier.load(tmp_path / "m", accelerator="cpu")
    assert loaded.module.classifier.encoder.initial_bn.eps == 1.0
