"""Auxiliary single-cell losses: hand-computed values, gradients, edge cases, validation and ranges."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from schce.losses import (
    BatchMixingLoss,
    ClusteringCompactnessLoss,
    DomainAdversarialLoss,
    GradientReversal,
    ShannonDiversityLoss,
    SimpsonDiversityLoss,
    VelocityConsistencyLoss,
    criterion_neg_log_bernoulli,
    elastic_cell_similarity_loss,
    grad_reverse,
    masked_mse_loss,
)

ATOL = 1e-6


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _finite_nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(torch.isfinite(grad).all()) and bool(grad.abs().sum() > 0)


# --------------------------------------------------------------------------------------------------------------------
# BatchMixingLoss
# --------------------------------------------------------------------------------------------------------------------

# Four cells on a line at 0, 1, 3, 7 with batches 0, 1, 0, 1.
LINE_X = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
LINE_B = torch.tensor([0, 1, 0, 1])


def test_batch_mixing_line_two_neighbours():
    # k = 2, temperature 1; softmax over two neighbours at d1 < d2 puts sigmoid(d2 - d1) on the nearer one.
    # cell 0 (x=0): cell 1 (d=1, b1), cell 2 (d=3, b0) -> p = (1 - s(2), s(2)),  H = h(s(2))
    # cell 1 (x=1): cell 0 (d=1, b0), cell 2 (d=2, b0) -> p = (1, 0),              H = 0
    # cell 2 (x=3): cell 1 (d=2, b1), cell 0 (d=3, b0) -> p = (1 - s(1), s(1)),  H = h(s(1))
    # cell 3 (x=7): cell 2 (d=4, b0), cell 1 (d=6, b1) -> p = (s(2), 1 - s(2)),  H = h(s(2))
    # loss = -(2 h(s(2)) + h(s(1))) / 4 with s = sigmoid, h = binary entropy.
    expected = -(2 * _binary_entropy(_sigmoid(2)) + _binary_entropy(_sigmoid(1))) / 4
    loss = BatchMixingLoss(n_batches=2, n_neighbors=2, temperature=1.0)(LINE_X, LINE_B)
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    assert expected == pytest.approx(-0.32821770, abs=1e-7)


def test_batch_mixing_temperature_scales_distances():
    # temperature 2 halves the distance gaps: cell 0 gets sigmoid(1), cell 2 sigmoid(0.5), cell 3 sigmoid(1).
    expected = -(2 * _binary_entropy(_sigmoid(1)) + _binary_entropy(_sigmoid(0.5))) / 4
    loss = BatchMixingLoss(2, n_neighbors=2, temperature=2.0)(LINE_X, LINE_B)
    assert loss.item() == pytest.approx(expected, abs=ATOL)


def test_batch_mixing_one_neighbour_is_zero():
    # With a single neighbour every neighbourhood is one batch: p is one-hot and H = 0 for all cells.
    loss = BatchMixingLoss(2, n_neighbors=1)(LINE_X, LINE_B)
    assert loss.item() == 0.0


def test_batch_mixing_square_reaches_minimum():
    # Unit square with batches 0, 1, 1, 0 going round: each corner's two nearest (d=1 each, the diagonal is
    # sqrt 2) are one cell of each batch with equal weight 1/2, so H = log 2 everywhere and loss = -log 2.
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loss = BatchMixingLoss(2, n_neighbors=2)(x, torch.tensor([0, 1, 1, 0]))
    assert loss.item() == pytest.approx(-math.log(2), abs=ATOL)


def test_batch_mixing_neighbours_capped_at_n_minus_1():
    # n_neighbors=15 on 4 cells uses k = 3: cell 0 sees d = 1 (b1), 3 (b0), 7 (b1) with softmax weights
    # w = e^{-d} / sum e^{-d}; p_b1 = (e^-1 + e^-7) / Z, etc. Compare against that explicit formula for all cells.
    d = (LINE_X - LINE_X.T).abs().double()
    expected = 0.0
    for i in range(4):
        others = [j for j in range(4) if j != i]
        w = torch.softmax(-d[i, others], dim=0)
        p1 = float(sum(w[m] for m, j in enumerate(others) if LINE_B[j] == 1))
        expected += _binary_entropy(p1) / 4
    loss = BatchMixingLoss(2, n_neighbors=15)(LINE_X, LINE_B)
    assert loss.item() == pytest.approx(-expected, abs=ATOL)


def test_batch_mixing_gradients_flow():
    x = LINE_X.clone().requires_grad_(True)
    BatchMixingLoss(2, n_neighbors=2)(x, LINE_B).backward()
    assert _finite_nonzero(x.grad)
    # Moving cell 2 (x=3) left shrinks the distance gaps seen by cells 0 and 3 (it is their batch-0 neighbour at
    # the larger/smaller distance), evening out their weights and lowering the loss, so d loss / d x_2 > 0.
    assert x.grad[2, 0].item() > 0


def test_batch_mixing_single_batch_is_exactly_zero():
    x = torch.randn(6, 3, requires_grad=True)
    loss = BatchMixingLoss(3, n_neighbors=4)(x, torch.full((6,), 2, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max().item() == 0.0


def test_batch_mixing_identical_embeddings_finite():
    # All distances are 0, so with k = 4 = N - 1 every cell weights the 4 others uniformly (1/4 each).
    # Labels 0, 1, 0, 1, 1: a batch-0 cell sees one 0 and three 1s -> H = h(1/4); a batch-1 cell sees two of each
    # -> H = log 2. loss = -(2 h(1/4) + 3 log 2) / 5.
    x = torch.zeros(5, 3, requires_grad=True)
    loss = BatchMixingLoss(2, n_neighbors=4)(x, torch.tensor([0, 1, 0, 1, 1]))
    loss.backward()
    expected = -(2 * _binary_entropy(0.25) + 3 * math.log(2)) / 5
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    assert torch.isfinite(x.grad).all()


def test_batch_mixing_range_random():
    gen = torch.Generator().manual_seed(0)
    loss_fn = BatchMixingLoss(3, n_neighbors=5, temperature=0.5)
    for _ in range(5):
        x = torch.randn(30, 4, generator=gen)
        b = torch.randint(0, 3, (30,), generator=gen)
        value = loss_fn(x, b).item()
        assert -math.log(3) - ATOL <= value <= 0.0


def test_batch_mixing_validation():
    loss_fn = BatchMixingLoss(2)
    with pytest.raises(ValueError, match=r"N >= 2 .*got \(1, 3\)"):
        loss_fn(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"embeddings must be a floating tensor of shape \(N, D\), got .*\(4,\)"):
        loss_fn(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"batch_labels must be a torch.long tensor of shape \(N,\) = \(4,\), got .*\(3,\)"
    ):
        loss_fn(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch_labels must be a torch.long .*got torch.float32"):
        loss_fn(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match=r"batch_labels must lie in \[0, 2\), got values in \[0, 2\]"):
        loss_fn(torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="temperature"):
        BatchMixingLoss(2, temperature=0.0)
    with pytest.raises(ValueError, match="n_neighbors"):
        BatchMixingLoss(2, n_neighbors=0)


# --------------------------------------------------------------------------------------------------------------------
# ClusteringCompactnessLoss
# --------------------------------------------------------------------------------------------------------------------


def test_compactness_given_centroids():
    # x = [0], [4]; a = [1, 0], [0.5, 0.5]; c = [0], [3].
    # compactness = (1*0^2 + 0*3^2 + 0.5*4^2 + 0.5*1^2) / N = (0 + 0 + 8 + 0.5) / 2 = 4.25
    # separation: ||c0 - c1|| = 3; min_separation 1 -> relu(1 - 3)^2 = 0; min_separation 5 -> (5 - 3)^2 = 4
    x = torch.tensor([[0.0], [4.0]])
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    c = torch.tensor([[0.0], [3.0]])
    assert ClusteringCompactnessLoss(1.0, 1.0)(x, a, c).item() == pytest.approx(4.25, abs=ATOL)
    # loss = 4.25 + 0.5 * 4 = 6.25
    assert ClusteringCompactnessLoss(0.5, 5.0)(x, a, c).item() == pytest.approx(6.25, abs=ATOL)


def test_compactness_computed_centroids_and_empty_cluster():
    # x = 0, 2, 10 with hard assignments (0, 0, 1): c0 = (0 + 2) / 2 = 1, c1 = 10.
    # compactness = (1 + 1 + 0) / 3 = 2/3; separation with margin 20: (20 - 9)^2 = 121; loss = 2/3 + 121.
    x = torch.tensor([[0.0], [2.0], [10.0]])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss_fn = ClusteringCompactnessLoss(separation_weight=1.0, min_separation=20.0)
    assert loss_fn(x, a).item() == pytest.approx(2 / 3 + 121, abs=1e-4)
    # A third cluster with no mass gets centroid 0 (1 away from c0) but is excluded from the pairs, so the
    # value is unchanged and nothing is NaN.
    a3 = torch.cat([a, torch.zeros(3, 1)], dim=1).requires_grad_(True)
    x3 = x.clone().requires_grad_(True)
    loss = loss_fn(x3, a3)
    loss.backward()
    assert loss.item() == pytest.approx(2 / 3 + 121, abs=1e-4)
    assert torch.isfinite(x3.grad).all() and torch.isfinite(a3.grad).all()


def test_compactness_single_cluster_has_no_separation():
    # K = 1: centroid = mean(0, 2, 4) = 2; compactness = (4 + 0 + 4) / 3 = 8/3; no pairs -> separation 0.
    x = torch.tensor([[0.0], [2.0], [4.0]])
    loss = ClusteringCompactnessLoss(separation_weight=10.0, min_separation=100.0)(x, torch.ones(3, 1))
    assert loss.item() == pytest.approx(8 / 3, abs=1e-5)


def test_compactness_gradients_flow():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=gen, requires_grad=True)
    logits = torch.randn(8, 3, generator=gen, requires_grad=True)
    c = torch.randn(3, 3, generator=gen, requires_grad=True)
    loss_fn = ClusteringCompactnessLoss(separation_weight=1.0, min_separation=10.0)
    loss_fn(x, torch.softmax(logits, dim=1)).backward()
    assert _finite_nonzero(x.grad) and _finite_nonzero(logits.grad)
    x.grad = None
    loss_fn(x, torch.softmax(logits, dim=1).detach(), c).backward()
    assert _finite_nonzero(x.grad) and _finite_nonzero(c.grad)


def test_compactness_validation():
    loss_fn = ClusteringCompactnessLoss()
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"assignments must have shape \(N, K\) = \(3, K\), got \(4, 2\)"):
        loss_fn(x, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"centroids must have shape \(K, D\) = \(2, 2\), got \(2, 3\)"):
        loss_fn(x, torch.full((3, 2), 0.5), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rows summing to 1.*softmax"):
        loss_fn(x, torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"embeddings must be a floating tensor of shape \(N, D\), got torch.int64"):
        loss_fn(torch.zeros(3, 2, dtype=torch.long), torch.full((3, 2), 0.5))


# --------------------------------------------------------------------------------------------------------------------
# VelocityConsistencyLoss
# --------------------------------------------------------------------------------------------------------------------


def test_velocity_hand_example():
    # cell 0: x = (0, 0), v = (1, 0), y = (0, 1): displacement (0, 1) is orthogonal to v -> 1 - cos = 1;
    #         x + 0.1 v - y = (0.1, -1) -> squares 0.01, 1.
    # cell 1: x = (1, 1), v = (2, 2), y = (1.2, 1.2): displacement (0.2, 0.2) parallel to v -> 1 - cos = 0;
    #         x + 0.1 v - y = (0, 0) -> squares 0, 0.
    # cosine term = (1 + 0) / 2 = 0.5; magnitude term = (0.01 + 1 + 0 + 0) / 4 = 0.2525.
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [1.2, 1.2]])
    assert VelocityConsistencyLoss(dt=0.1)(x, v, y).item() == pytest.approx(0.5 + 0.2525, abs=ATOL)
    # weights 2 and 0.5: 2 * 0.5 + 0.5 * 0.2525 = 1.12625
    loss = VelocityConsistencyLoss(dt=0.1, cosine_weight=2.0, magnitude_weight=0.5)(x, v, y)
    assert loss.item() == pytest.approx(1.12625, abs=ATOL)


def test_velocity_gradients_and_zero_vectors():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=gen)
    v = torch.randn(4, 5, generator=gen, requires_grad=True)
    y = torch.randn(4, 5, generator=gen)
    VelocityConsistencyLoss()(x, v, y).backward()
    assert _finite_nonzero(v.grad)
    # Zero velocity and zero displacement: cosine counts as 0 -> cosine term 1, magnitude term 0.
    z = torch.zeros(2, 3, requires_grad=True)
    loss = VelocityConsistencyLoss()(torch.ones(2, 3), z, torch.ones(2, 3))
    loss.backward()
    assert loss.item() == pytest.approx(1.0, abs=ATOL)
    assert torch.isfinite(z.grad).all()


def test_velocity_validation():
    loss_fn = VelocityConsistencyLoss()
    with pytest.raises(ValueError, match=r"velocity must have the shape of expression, \(2, 3\), got \(2, 4\)"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(
        ValueError, match=r"future_expression must have the shape of expression, \(2, 3\), got \(3, 3\)"
    ):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"expression must be a floating tensor of shape \(N, G\), got .*\(3,\)"):
        loss_fn(torch.zeros(3), torch.zeros(3), torch.zeros(3))


# --------------------------------------------------------------------------------------------------------------------
# Diversity losses
# --------------------------------------------------------------------------------------------------------------------

DIVERSITY_A = torch.tensor([[0.5, 0.5], [1.0, 0.0]])


def test_shannon_hand_example():
    # row 0: -(0.5 log 0.5 + 0.5 log 0.5) = log 2; row 1: -(1 log 1 + 0 log 0) = 0; mean = log(2) / 2.
    assert ShannonDiversityLoss()(DIVERSITY_A).item() == pytest.approx(math.log(2) / 2, abs=ATOL)


def test_simpson_hand_example():
    # row 0: 0.25 + 0.25 = 0.5; row 1: 1 + 0 = 1; mean = 0.75.
    assert SimpsonDiversityLoss()(DIVERSITY_A).item() == pytest.approx(0.75, abs=ATOL)


def test_diversity_gradients_finite_at_zero_entries():
    a = DIVERSITY_A.clone().requires_grad_(True)
    ShannonDiversityLoss()(a).backward()
    assert torch.isfinite(a.grad).all()
    logits = torch.tensor([[0.3, -0.2, 1.0], [2.0, 0.0, -1.0]], requires_grad=True)
    ShannonDiversityLoss()(torch.softmax(logits, dim=1)).backward()
    assert _finite_nonzero(logits.grad)
    logits.grad = None
    SimpsonDiversityLoss()(torch.softmax(logits, dim=1)).backward()
    assert _finite_nonzero(logits.grad)


def test_diversity_ranges_random_softmax():
    gen = torch.Generator().manual_seed(3)
    for k in (2, 5, 17):
        a = torch.softmax(3 * torch.randn(50, k, generator=gen), dim=1)
        shannon = ShannonDiversityLoss()(a).item()
        simpson = SimpsonDiversityLoss()(a).item()
        assert 0.0 <= shannon <= math.log(k) + ATOL
        assert 1 / k - ATOL <= simpson <= 1.0 + ATOL
    # The bounds are attained: uniform rows give log K and 1/K.
    uniform = torch.full((3, 4), 0.25)
    assert ShannonDiversityLoss()(uniform).item() == pytest.approx(math.log(4), abs=ATOL)
    assert SimpsonDiversityLoss()(uniform).item() == pytest.approx(0.25, abs=ATOL)


@pytest.mark.parametrize("loss_cls", [ShannonDiversityLoss, SimpsonDiversityLoss])
def test_diversity_validation(loss_cls):
    with pytest.raises(ValueError, match=r"rows summing to 1.*torch.softmax"):
        loss_cls()(torch.tensor([[0.5, 0.6]]))
    with pytest.raises(ValueError, match=r"non-negative.*minimum -0.5"):
        loss_cls()(torch.tensor([[1.5, -0.5]]))
    with pytest.raises(ValueError, match=r"assignments must be a floating tensor of shape \(N, K\), got .*\(2,\)"):
        loss_cls()(torch.tensor([0.5, 0.5]))


# --------------------------------------------------------------------------------------------------------------------
# scGPT objectives
# --------------------------------------------------------------------------------------------------------------------


def test_masked_mse_hand_example():
    # squared errors [[0, 4], [9, 0]]; mask keeps three entries (drops the 9): (0 + 4 + 0) / 3 = 4/3.
    inp = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    mask = torch.tensor([[True, True], [False, True]])
    loss = masked_mse_loss(inp, target, mask)
    assert loss.item() == pytest.approx(4 / 3, abs=ATOL)
    assert masked_mse_loss(inp, target, mask.float()).item() == pytest.approx(4 / 3, abs=ATOL)
    loss.backward()
    # d/d input = 2 (input - target) mask / 3: only entry (0, 1) is non-zero, 2 * 2 / 3.
    assert torch.allclose(inp.grad, torch.tensor([[0.0, 4 / 3], [0.0, 0.0]]))


def test_masked_mse_validation():
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="mask selects no entries"):
        masked_mse_loss(x, x, torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have the shape of input, \(2, 2\), got \(2,\)"):
        masked_mse_loss(x, x, torch.ones(2))
    with pytest.raises(ValueError, match=r"target must have the shape of input, \(2, 2\), got \(2, 3\)"):
        masked_mse_loss(x, torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="only 0 and 1"):
        masked_mse_loss(x, x, torch.full((2, 2), 0.5))


def test_bernoulli_nll_hand_example():
    # selected: (p=0.9, y=1) -> -log 0.9; (p=0.2, y=0) -> -log 0.8; (p=0.7, y=1) -> -log 0.7; the (0.5, y=0)
    # entry is masked out. NLL = -(log 0.9 + log 0.8 + log 0.7) / 3.
    probs = torch.tensor([[0.9, 0.2], [0.5, 0.7]], requires_grad=True)
    target = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 1], [0, 1]])
    loss = criterion_neg_log_bernoulli(probs, target, mask)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.7)) / 3
    assert loss.item() == pytest.approx(expected, abs=ATOL)
    # Same as torch.distributions.Bernoulli on the selected entries.
    ref = -torch.distributions.Bernoulli(probs=probs.detach()).log_prob((target > 0).float())[mask.bool()].mean()
    assert loss.item() == pytest.approx(ref.item(), abs=ATOL)
    loss.backward()
    assert _finite_nonzero(probs.grad)
    assert probs.grad[1, 0].item() == 0.0


def test_bernoulli_nll_extreme_probs_finite():
    # p = 0 with y = 1 and p = 1 with y = 0 are clamped to eps: loss = -log(eps) per entry, finite.
    probs = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = criterion_neg_log_bernoulli(probs, torch.tensor([1.0, 0.0]), torch.ones(2))
    loss.backward()
    eps = torch.finfo(torch.float32).eps
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(-math.log(eps), rel=1e-4)
    assert torch.isfinite(probs.grad).all()
    # Correct confident predictions cost ~0.
    assert criterion_neg_log_bernoulli(probs.detach(), torch.tensor([0.0, 1.0]), torch.ones(2)).item() < 1e-6


def test_bernoulli_nll_validation():
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\].*sigmoid"):
        criterion_neg_log_bernoulli(torch.tensor([1.5]), torch.tensor([1.0]), torch.ones(1))
    with pytest.raises(ValueError, match="mask selects no entries"):
        criterion_neg_log_bernoulli(torch.tensor([0.5]), torch.tensor([1.0]), torch.zeros(1))
    with pytest.raises(ValueError, match=r"target must have the shape of probs, \(2,\), got \(3,\)"):
        criterion_neg_log_bernoulli(torch.tensor([0.5, 0.5]), torch.ones(3), torch.ones(2))


def _scgpt_ecs(emb: torch.Tensor, threshold: float) -> torch.Tensor:
    """ECS as scGPT defines it, written out entry by entry: zeroed diagonal, mean over all N^2 entries."""
    n = emb.shape[0]
    rows = [emb[i] / torch.clamp(emb[i].norm(), min=1e-12) for i in range(n)]
    total = emb.new_zeros(())
    for i in range(n):
        for j in range(n):
            s = torch.clamp(rows[i] @ rows[j], min=0) if i != j else emb.new_zeros(())
            total = total + 1 - (s - threshold) ** 2
    return total / n**2


def test_ecs_hand_example():
    # e1 = (1, 0), e2 = (1, 1), e3 = (-2, 0): cos(e1, e2) = 1/sqrt 2, cos(e1, e3) = -1, cos(e2, e3) = -1/sqrt 2.
    # relu: 0.7071, 0, 0. Terms with threshold 0.8: 1 - (0.7071 - 0.8)^2 = 0.99137..., 1 - 0.64 = 0.36 twice.
    # The ordered off-diagonal pairs repeat each unordered pair twice, so their mean is (0.99137 + 0.36 + 0.36) / 3.
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.0]], requires_grad=True)
    off_diagonal = (1 - (1 / math.sqrt(2) - 0.8) ** 2 + 0.36 + 0.36) / 3
    loss = elastic_cell_similarity_loss(emb, ecs_threshold=0.8, pairs="off_diagonal")
    assert loss.item() == pytest.approx(off_diagonal, abs=ATOL)
    assert off_diagonal == pytest.approx(0.57045695, abs=1e-7)
    loss.backward()
    assert _finite_nonzero(emb.grad)
    # scGPT's default: the 3 zeroed diagonal entries add 1 - 0.8^2 = 0.36 each, over 9 entries.
    expected = (6 * off_diagonal + 3 * 0.36) / 9
    assert elastic_cell_similarity_loss(emb, ecs_threshold=0.8).item() == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.8, 1.0])
def test_ecs_default_is_scgpts_definition(threshold):
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    emb[4] = 0.0  # a zero row: cosine 0 with everything
    a = emb.clone().requires_grad_(True)
    b = emb.clone().requires_grad_(True)
    got, expected = elastic_cell_similarity_loss(a, threshold), _scgpt_ecs(b, threshold)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    got.backward()
    expected.backward()
    # The zero row's own gradient depends on how the norm's kink is handled (1/eps or 0); the others do not.
    keep = torch.arange(emb.shape[0]) != 4
    torch.testing.assert_close(a.grad[keep], b.grad[keep], rtol=1e-10, atol=1e-12)
    # The off-diagonal variant is the same sum over N (N - 1) pairs instead of N^2 entries.
    n = emb.shape[0]
    off = elastic_cell_similarity_loss(emb, threshold, pairs="off_diagonal")
    torch.testing.assert_close(
        off, (expected.detach() * n**2 - n * (1 - threshold**2)) / (n * (n - 1)), rtol=1e-12, atol=1e-12
    )


def test_ecs_zero_rows_and_validation():
    # A zero row has cosine 0 with everything: pairs with it give 1 - 0.8^2 = 0.36. With rows (0,0) and (1,0):
    # both ordered pairs are 0.36.
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss = elastic_cell_similarity_loss(emb, pairs="off_diagonal")
    loss.backward()
    assert loss.item() == pytest.approx(0.36, abs=ATOL)
    assert torch.isfinite(emb.grad).all()
    with pytest.raises(ValueError, match=r"N >= 2 .*got \(1, 4\)"):
        elastic_cell_similarity_loss(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"cell_emb must be a floating tensor of shape \(N, D\), got .*\(4,\)"):
        elastic_cell_similarity_loss(torch.ones(4))
    with pytest.raises(ValueError, match="ecs_threshold"):
        elastic_cell_similarity_loss(torch.ones(2, 2), ecs_threshold=1.5)
    with pytest.raises(ValueError, match="pairs must be 'all'"):
        elastic_cell_similarity_loss(torch.ones(2, 2), pairs="upper")


# --------------------------------------------------------------------------------------------------------------------
# Gradient reversal and domain-adversarial loss
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_gradient_reversal(alpha):
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    upstream = torch.tensor([0.5, 1.0, -4.0])
    for y in (GradientReversal(alpha)(x), grad_reverse(x, alpha)):
        torch.testing.assert_close(y, x, rtol=0, atol=0)  # the forward pass is the identity: the same values
        (grad,) = torch.autograd.grad(y, x, grad_outputs=upstream)
        assert torch.allclose(grad, -alpha * upstream)


def _separable_domains(n: int = 64, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    labels = torch.arange(n) % 2
    emb = torch.randn(n, dim, generator=gen) + 3.0 * (2 * labels.float() - 1).unsqueeze(1)
    return emb, labels


def test_domain_adversarial_discriminator_learns():
    torch.manual_seed(0)
    emb, labels = _separable_domains()
    loss_fn = DomainAdversarialLoss(n_input=4, n_domains=2, hidden=16, n_layers=2)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    first = loss_fn(emb, labels).item()
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(emb, labels)
        loss.backward()
        opt.step()
    last = loss_fn(emb, labels).item()
    assert last < 0.5 * first
    assert loss_fn.logits(emb).shape == (64, 2)


def test_domain_adversarial_reverses_embedding_gradient():
    torch.manual_seed(0)
    emb, labels = _separable_domains()
    loss_fn = DomainAdversarialLoss(n_input=4, n_domains=2, hidden=8, n_layers=1, alpha=0.5)
    plain = copy.deepcopy(loss_fn.discriminator)  # same weights, no reversal

    x = emb.clone().requires_grad_(True)
    loss = loss_fn(x, labels)
    (grad_rev,) = torch.autograd.grad(loss, x)
    x_plain = emb.clone().requires_grad_(True)
    (grad_plain,) = torch.autograd.grad(F.cross_entropy(plain(x_plain), labels), x_plain)

    assert loss.item() == pytest.approx(F.cross_entropy(plain(emb), labels).item(), abs=ATOL)
    assert _finite_nonzero(grad_plain)
    assert torch.allclose(grad_rev, -0.5 * grad_plain, atol=1e-7)
    # The discriminator's own parameters get the ordinary (unreversed) gradient.
    loss_fn(emb, labels).backward()
    F.cross_entropy(plain(emb), labels).backward()
    assert torch.allclose(loss_fn.discriminator[0].weight.grad, plain[0].weight.grad, atol=1e-7)


def test_domain_adversarial_validation():
    with pytest.raises(ValueError, match="n_domains must be an integer >= 2, got 1"):
        DomainAdversarialLoss(4, 1)
    loss_fn = DomainAdversarialLoss(4, 3, hidden=8, n_layers=0)
    assert len(loss_fn.discriminator) == 1  # n_layers=0 -> a single Linear(4, 3)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N, n_input\) = \(N, 4\), got \(2, 5\)"):
        loss_fn(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"domain_labels must be a torch.long tensor of shape \(N,\) = \(2,\)"):
        loss_fn(torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"domain_labels must lie in \[0, 3\), got values in \[-1, 0\]"):
        loss_fn(torch.zeros(2, 4), torch.tensor([0, -1]))
    loss_fn.alpha = 0.25
    assert loss_fn.gradient_reversal.alpha == 0.25
    with pytest.raises(ValueError, match="alpha"):
        grad_reverse(torch.zeros(1), alpha=-1.0)
