"""Unit tests of the training pieces that the full training runs use: the optimiser choice, the epoch sampler and the
resume bookkeeping (fast: no Trainer, no data)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _private import LBFGS_MAX_VALUES, EpochBatchSampler, TrainingProgress, adamw, resolve_optimizer

# ------------------------------------------------------------------------------------------------ resolve_optimizer

LINEAR_IN_MEMORY = {
    "backbone": "linear",
    "recipe": None,
    "n_values": 1000,
    "devices": "auto",
    "batch_size": None,
    "stochastic": [],
    "gradient_clip_val": None,
}


def test_automatic_choice_is_lbfgs_only_for_the_plain_in_memory_linear_model():
    assert resolve_optimizer(None, **LINEAR_IN_MEMORY) == "lbfgs"
    for change in (
        {"backbone": "mlp"},
        {"recipe": "sctab"},
        {"n_values": None},  # a datamodule
        {"n_values": LBFGS_MAX_VALUES + 1},  # too large for full-batch steps
        {"devices": 2},
        {"batch_size": 256},
        {"stochastic": ["augmentation"]},
        {"gradient_clip_val": 1.0},
    ):
        assert resolve_optimizer(None, **{**LINEAR_IN_MEMORY, **change}) == "adamw", change
    assert resolve_optimizer(None, **{**LINEAR_IN_MEMORY, "n_values": LBFGS_MAX_VALUES}) == "lbfgs"


def test_cpu_adamw_is_fused_and_takes_the_default_steps():
    """The fused CPU AdamW of the plan against torch's default one: the same parameters after 20 steps to 1e-5."""
    params = []
    for make in (adamw, torch.optim.AdamW):
        torch.manual_seed(0)
        layers = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.SiLU(), torch.nn.Linear(16, 4))
        opt = make(layers.parameters(), lr=1e-2, weight_decay=0.05)
        gen = torch.Generator().manual_seed(1)
        for _ in range(20):
            opt.zero_grad()
            layers(torch.randn(8, 30, generator=gen)).square().mean().backward()
            opt.step()
        params.append([p.detach() for p in layers.parameters()])
        assert opt.param_groups[0]["fused"] is (True if make is adamw else None)
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_is_not_fused_under_mixed_precision():
    """Lightning's mixed-precision gradient clipping refuses an optimizer that unscales itself (a fused one)."""
    layer = torch.nn.Linear(4, 2)
    assert adamw(layer.parameters(), lr=1e-3, weight_decay=0.0, mixed_precision=True).param_groups[0]["fused"] is None
    assert adamw(layer.parameters(), lr=1e-3, weight_decay=0.0).param_groups[0]["fused"] is True


def test_adamw_is_always_allowed_and_lbfgs_explains_every_obstacle():
    assert resolve_optimizer("adamw", **{**LINEAR_IN_MEMORY, "backbone": "tabnet", "n_values": None}) == "adamw"
    assert resolve_optimizer("lbfgs", **LINEAR_IN_MEMORY) == "lbfgs"
    bad = {**LINEAR_IN_MEMORY, "backbone": "mlp", "devices": 2, "batch_size": 64, "stochastic": ["input dropout"]}
    with pytest.raises(ValueError, match="optimizer='lbfgs' cannot train this model") as err:
        resolve_optimizer("lbfgs", **bad)
    for part in ("mlp backbone", "devices=2", "batch_size=None", "input dropout"):
        assert part in str(err.value)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match=r"optimizer must be 'adamw', 'lbfgs' or None.*got 'sgd'"):
        resolve_optimizer("sgd", **LINEAR_IN_MEMORY)


# ------------------------------------------------------------------------------------------------ EpochBatchSampler


def _rows(sampler) -> list[list[int]]:
    return list(iter(sampler))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a, b = EpochBatchSampler(103, 10, seed=4), EpochBatchSampler(103, 10, seed=4)
    assert _rows(a) == _rows(b)
    first = _rows(a)
    assert sorted(i for batch in first for i in batch) == list(range(103))  # every row once
    assert [len(batch) for batch in first] == [10] * 10 + [3]
    a.set_epoch(1)
    assert _rows(a) != first
    b.set_epoch(1)
    assert _rows(a) == _rows(b)
    assert _rows(EpochBatchSampler(103, 10, seed=5)) != first
    assert _rows(EpochBatchSampler(25, 10, shuffle=False)) == [
        list(range(10)),
        list(range(10, 20)),
        list(range(20, 25)),
    ]


def test_a_single_row_last_batch_is_dropped_unless_asked_to_keep_it():
    assert [len(b) for b in _rows(EpochBatchSampler(21, 10))] == [10, 10]
    assert len(EpochBatchSampler(21, 10)) == 2
    assert [len(b) for b in _rows(EpochBatchSampler(21, 10, drop_single=False))] == [10, 10, 1]
    assert [len(b) for b in _rows(EpochBatchSampler(1, 10))] == [1]  # never drop the only batch
    with pytest.raises(ValueError, match="batch_size must be positive"):
        EpochBatchSampler(10, 0)


def test_resume_skips_the_batches_already_trained_on_once():
    sampler = EpochBatchSampler(50, 8, seed=2)
    sampler.set_epoch(3)
    whole = _rows(sampler)
    sampler.resume(3, 4)
    assert _rows(sampler) == whole[4:]
    assert _rows(sampler) == whole  # the skip applies to one iteration only


def test_ranks_take_disjoint_equal_shards_of_one_permutation():
    shards = [EpochBatchSampler(103, 7, seed=1, num_replicas=3, rank=r).positions(epoch=2) for r in range(3)]
    assert [len(s) for s in shards] == [34, 34, 34]  # 103 // 3 * 3 rows: one sits out this epoch
    joined = np.concatenate(shards)
    assert len(set(joined.tolist())) == 102
    whole = EpochBatchSampler(103, 7, seed=1).positions(epoch=2)
    np.testing.assert_array_equal(np.sort(joined), np.sort(whole[:102]))


# ------------------------------------------------------------------------------------------------ TrainingProgress


def _trainer(epoch: int) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch)


def test_progress_records_the_position_and_resumes_the_sampler_there():
    sampler = EpochBatchSampler(40, 10, seed=0)
    progress = TrainingProgress(sampler, fingerprint={"seed": 0, "n_train": 40})
    progress.on_train_epoch_start(_trainer(1), None)
    for i in range(2):
        progress.on_train_batch_end(_trainer(1), None, None, None, i)
    state = progress.state_dict()
    assert (state["epoch"], state["done"]) == (1, 2)

    fresh_sampler = EpochBatchSampler(40, 10, seed=0)
    fresh = TrainingProgress(fresh_sampler, fingerprint={"seed": 0, "n_train": 40})
    fresh.load_state_dict(state)
    sampler.set_epoch(1)
    assert _rows(fresh_sampler) == _rows(sampler)[2:]


def test_progress_saved_at_an_epoch_end_continues_with_the_next_epoch():
    sampler = EpochBatchSampler(40, 10, seed=0)
    progress = TrainingProgress(sampler)
    for i in range(len(sampler)):
        progress.on_train_batch_end(_trainer(0), None, None, None, i)
    fresh = TrainingProgress(EpochBatchSampler(40, 10, seed=0))
    fresh.load_state_dict(progress.state_dict())
    assert (fresh.epoch, fresh.done) == (1, 0) and fresh.sampler.epoch == 1


def test_progress_restores_the_random_state_before_the_next_step():
    progress = TrainingProgress(EpochBatchSampler(10, 5))
    torch.manual_seed(123)
    state = progress.state_dict()
    expected = torch.rand(3)
    fresh = TrainingProgress(EpochBatchSampler(10, 5))
    fresh.load_state_dict(state)
    torch.manual_seed(999)  # whatever happens between loading and training
    fresh.on_train_batch_start(_trainer(0), None, None, 0)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)  # the same generator state, same draws


def test_progress_refuses_a_checkpoint_of_another_run():
    state = TrainingProgress(EpochBatchSampler(10, 5), fingerprint={"seed": 0, "batch_size": 5}).state_dict()
    other = TrainingProgress(EpochBatchSampler(10, 5), fingerprint={"seed": 1, "batch_size": 5})
    with pytest.raises(ValueError, match=r"different training run \(seed: checkpoint 0, now 1\)"):
        other.load_state_dict(state)
