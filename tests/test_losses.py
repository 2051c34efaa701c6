import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schce.losses import (
    HierarchicalCrossEntropyLoss,
    hierarchical_cross_entropy,
    hierarchical_log_probs,
    log_mask_probability,
)

# HCE paper example: labels A..E, edges A->B, A->C, B->D, B->E, C->E.
# Row i lists label i and its descendants.
R_PAPER = torch.tensor(
    [
        [1, 1, 1, 1, 1],  # A: A B C D E
        [0, 1, 0, 1, 1],  # B: B D E
        [0, 0, 1, 0, 1],  # C: C E
        [0, 0, 0, 1, 0],  # D
        [0, 0, 0, 0, 1],  # E
    ],
    dtype=torch.float32,
)
P_PAPER = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
# q_A = 1, q_B = 0.2 + 0.15 + 0.25 = 0.6, q_C = 0.3 + 0.25 = 0.55, q_D = 0.15, q_E = 0.25
Q_PAPER = torch.tensor([1.0, 0.6, 0.55, 0.15, 0.25])


def reference_expression(logits, targets, reachability, weight=None, reduction="mean", eps=1e-6):
    p = torch.softmax(logits, dim=-1)
    q = p @ reachability.T
    return F.nll_loss(torch.log(q + eps), targets, weight=weight, reduction=reduction)


def random_dag_reachability(k, p_edge, seed):
    """Reachability of a random DAG (edges only from lower to higher index), by transitive closure."""
    rng = np.random.default_rng(seed)
    adj = np.triu(rng.random((k, k)) < p_edge, k=1)
    reach = adj | np.eye(k, dtype=bool)
    # Floyd-Warshall style closure: i reaches j if i reaches m and m reaches j.
    for m in range(k):
        reach |= reach[:, [m]] & reach[[m], :]
    return torch.from_numpy(reach.astype(np.float32))


@pytest.fixture
def dag():
    return random_dag_reachability(30, 0.1, seed=0)


def test_paper_example_by_hand():
    logits = torch.log(P_PAPER).expand(5, 5).contiguous()
    targets = torch.arange(5)
    log_loss = hierarchical_cross_entropy(logits, targets, R_PAPER, reduction="none")
    torch.testing.assert_close(log_loss, -torch.log(Q_PAPER), rtol=0, atol=1e-6)
    ref_loss = hierarchical_cross_entropy(logits, targets, R_PAPER, form="reference", reduction="none")
    torch.testing.assert_close(ref_loss, -torch.log(Q_PAPER + 1e-6), rtol=0, atol=1e-6)
    # The root collects all mass, so its loss is zero in log form (no epsilon: the reference form gives ~1e-6).
    assert abs(log_loss[0].item()) <= 1e-7
    torch.testing.assert_close(hierarchical_log_probs(logits[:1], R_PAPER)[0], torch.log(Q_PAPER), rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_form_bit_for_bit(dag, with_weight, reduction):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 30, generator=gen) * 3
    targets = torch.randint(0, 30, (64,), generator=gen)
    weight = torch.rand(30, generator=gen) + 0.1 if with_weight else None
    got = hierarchical_cross_entropy(logits, targets, dag, weight, form="reference", reduction=reduction)
    expected = reference_expression(logits, targets, dag, weight, reduction=reduction)
    # Bit for bit (DESIGN): the same operations as the published expression, in the same process.
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # A bool reachability is cast to the logits' dtype, giving the same bits.
    got_bool = hierarchical_cross_entropy(logits, targets, dag.bool(), weight, form="reference", reduction=reduction)
    torch.testing.assert_close(got_bool, expected, rtol=0, atol=0)


def test_forms_agree_where_q_large(dag):
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(512, 30, generator=gen) * 2
    targets = torch.randint(0, 30, (512,), generator=gen)
    q = (torch.softmax(logits, -1) @ dag.T)[torch.arange(512), targets]

    log_none = hierarchical_cross_entropy(logits, targets, dag, reduction="none")
    # With eps = 0 the reference is -log q itself, so both forms agree everywhere for moderate logits.
    ref0 = hierarchical_cross_entropy(logits, targets, dag, form="reference", reduction="none", eps=0.0)
    torch.testing.assert_close(log_none, ref0, rtol=0, atol=1e-5)

    # With the default eps the forms differ by log(1 + eps / q), i.e. below 1e-5 once q >> 1e-6.
    ref = hierarchical_cross_entropy(logits, targets, dag, form="reference", reduction="none")
    large = q > 0.2
    assert large.sum() > 100
    torch.testing.assert_close(log_none[large], ref[large], rtol=0, atol=1e-5)
    assert torch.all((ref - log_none).abs() <= 1e-6 / q + 1e-5)

    sel = torch.nonzero(large).squeeze(1)
    log_mean = hierarchical_cross_entropy(logits[sel], targets[sel], dag)
    ref_mean = hierarchical_cross_entropy(logits[sel], targets[sel], dag, form="reference")
    assert abs(log_mean.item() - ref_mean.item()) < 1e-5


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_identity_reachability_is_cross_entropy(with_weight, reduction):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 12, generator=gen) * 2
    targets = torch.randint(0, 12, (40,), generator=gen)
    weight = torch.rand(12, generator=gen) + 0.1 if with_weight else None
    got = hierarchical_cross_entropy(logits, targets, torch.eye(12), weight, reduction=reduction)
    expected = F.cross_entropy(logits, targets, weight=weight, reduction=reduction)
    # Relative tolerance for "sum": float32 summation order differs between the two implementations.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_saturated_logits_log_form_finite_reference_vanishes():
    # Row 0: target D, all mass on C (outside D's subtree). Row 1: target A, mass on E (inside A's subtree).
    logits = torch.full((2, 5), -1e4)
    logits[0, 2] = 1e4
    logits[1, 4] = 1e4
    targets = torch.tensor([3, 0])

    x = logits.clone().requires_grad_(True)
    loss = hierarchical_cross_entropy(x, targets, R_PAPER, reduction="none")
    # Row 0: logsumexp = 1e4, masked logsumexp over {D} = -1e4, so the loss is 2e4; row 1 loses nothing.
    torch.testing.assert_close(loss.detach(), torch.tensor([2e4, 0.0]), rtol=1e-6, atol=0)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    # d loss / d logits = softmax(logits) - softmax(logits restricted to the target subtree).
    expected_grad = torch.zeros(2, 5)
    expected_grad[0, 2] = 1.0
    expected_grad[0, 3] = -1.0
    torch.testing.assert_close(x.grad, expected_grad, rtol=0, atol=1e-6)

    # The reference form saturates at -log(eps) for row 0 and gives no gradient at all: why "log" is the default.
    y = logits.clone().requires_grad_(True)
    ref = hierarchical_cross_entropy(y, targets, R_PAPER, form="reference", reduction="none")
    assert ref[0].item() == pytest.approx(-math.log(1e-6), rel=1e-5)
    ref.sum().backward()
    assert torch.count_nonzero(y.grad) == 0


def test_weighted_mean_matches_manual(dag):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(50, 30, generator=gen)
    targets = torch.randint(0, 30, (50,), generator=gen)
    weight = torch.rand(30, generator=gen) * 3
    per_sample = hierarchical_cross_entropy(logits, targets, dag, reduction="none")
    unweighted = -log_mask_probability(logits, dag[targets].bool())
    w = weight[targets]
    torch.testing.assert_close(per_sample, unweighted, rtol=0, atol=0)
    mean = hierarchical_cross_entropy(logits, targets, dag, weight)
    torch.testing.assert_close(mean, (w * unweighted).sum() / w.sum(), rtol=1e-6, atol=1e-6)
    total = hierarchical_cross_entropy(logits, targets, dag, weight, reduction="sum")
    torch.testing.assert_close(total, (w * unweighted).sum(), rtol=1e-6, atol=1e-5)
    none = hierarchical_cross_entropy(logits, targets, dag, weight, reduction="none")
    torch.testing.assert_close(none, w * unweighted, rtol=0, atol=0)


def test_hierarchical_log_probs_moderate(dag):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 30, generator=gen) * 2
    got = hierarchical_log_probs(logits, dag)
    assert got.shape == (20, 30)
    expected = torch.log(torch.softmax(logits, -1) @ dag.T)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_hierarchical_log_probs_chunked(dag, monkeypatch):
    # Force many small chunks: the result must not depend on chunking.
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(7, 30, generator=gen)
    full = hierarchical_log_probs(logits, dag)
    monkeypatch.setattr("schce.losses.hce._CHUNK_ELEMENTS", 7 * 30 * 4)
    torch.testing.assert_close(hierarchical_log_probs(logits, dag), full, rtol=1e-6, atol=1e-6)


def test_hierarchical_log_probs_saturated():
    # All mass on D: q_A = q_B = q_D ~ 1, q_C and q_E ~ 2e^{-2e4}, which is still exact in log space.
    logits = torch.full((1, 5), -1e4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        logits[0, 3] = 1e4
    got = hierarchical_log_probs(logits, R_PAPER)
    assert torch.isfinite(got).all()
    expected = torch.tensor([[0.0, 0.0, -2e4 + math.log(2), 0.0, -2e4]], dtype=torch.float64)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-9)
    got.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # The float32 matmul form underflows to -inf for the same labels.
    assert torch.isinf(torch.log(torch.softmax(logits.detach().float(), -1) @ R_PAPER.T)).sum() == 2


def test_log_mask_probability_full_and_empty():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, generator=gen, requires_grad=True)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2] = False
    out = log_mask_probability(logits, mask)
    torch.testing.assert_close(out[:2], torch.zeros(2), rtol=0, atol=1e-6)
    assert out[2].item() == -math.inf
    # Empty rows contribute a zero gradient instead of NaN.
    out[:2].sum().backward()
    assert torch.isfinite(logits.grad).all()
    # 0/1 masks behave like bool masks.
    mask01 = torch.tensor([[1, 0, 1, 0, 0, 0]] * 3)
    expected = torch.log(torch.softmax(logits.detach(), -1)[:, [0, 2]].sum(-1))
    torch.testing.assert_close(log_mask_probability(logits.detach(), mask01), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("logits", "targets", "reachability", "weight", "kwargs"),
    [
        (torch.zeros(5), torch.zeros(1, dtype=torch.long), torch.eye(5), None, {}),  # 1-D logits
        (torch.zeros(2, 5), torch.zeros(2, 1, dtype=torch.long), torch.eye(5), None, {}),  # 2-D targets
        (torch.zeros(2, 5), torch.zeros(2), torch.eye(5), None, {}),  # float targets
        (torch.zeros(2, 5), torch.zeros(3, dtype=torch.long), torch.eye(5), None, {}),  # wrong batch size
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.eye(4), None, {}),  # K mismatch
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.ones(5, 4), None, {}),  # non-square
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.eye(5), torch.ones(4), {}),  # weight shape
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.eye(5), None, {"form": "bogus"}),
        (torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), torch.eye(5), None, {"reduction": "bogus"}),
    ],
)
def test_invalid_inputs_raise(logits, targets, reachability, weight, kwargs):
    with pytest.raises(ValueError):
        hierarchical_cross_entropy(logits, targets, reachability, weight, **kwargs)


def test_invalid_inputs_raise_other_entry_points():
    with pytest.raises(ValueError):
        log_mask_probability(torch.zeros(2, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        log_mask_probability(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        hierarchical_log_probs(torch.zeros(2, 5), torch.eye(4))
    with pytest.raises(ValueError):
        HierarchicalCrossEntropyLoss(torch.eye(5), form="bogus")
    with pytest.raises(ValueError):
        HierarchicalCrossEntropyLoss(torch.ones(5, 4))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_log_form(reduction):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 4])
    weight = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    r = R_PAPER.double()
    assert torch.autograd.gradcheck(
        lambda x: hierarchical_cross_entropy(x, targets, r, weight, reduction=reduction), (logits,)
    )
    assert torch.autograd.gradcheck(lambda x: hierarchical_log_probs(x, r), (logits,))


@pytest.mark.parametrize("form", ["log", "reference"])
def test_module_matches_function_and_keeps_state_dict_clean(dag, form):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(16, 30, generator=gen)
    targets = torch.randint(0, 30, (16,), generator=gen)
    weight = torch.rand(30, generator=gen) + 0.1
    loss_fn = HierarchicalCrossEntropyLoss(dag, weight, form=form)
    expected = hierarchical_cross_entropy(logits, targets, dag, weight, form=form)
    torch.testing.assert_close(loss_fn(logits, targets), expected, rtol=1e-6, atol=1e-7)
    assert (loss_fn.reachability == dag).all()
    assert loss_fn.state_dict() == {}

    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(4, 30)
    model.loss = loss_fn
    assert set(model.state_dict()) == {"backbone.weight", "backbone.bias"}

    no_weight = HierarchicalCrossEntropyLoss(dag, form=form, reduction="none")
    torch.testing.assert_close(
        no_weight(logits, targets),
        hierarchical_cross_entropy(logits, targets, dag, form=form, reduction="none"),
        rtol=1e-6,
        atol=1e-7,
    )
