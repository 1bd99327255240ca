"""The global-batch contract end to end: the split of a global batch over processes and micro-steps does not change training."""

from __future__ import annotations

import pytest
import torch

from conftest import metrics, train

COMMON = (
    "data.name=synthetic", "data.size=512", "data.shape=[16]", "data.label_noise=0.1",
    "model.name=mlp", "model.width=32", "model.depth=2", "train.precision=fp32",
    "optim.lr=0.05", "optim.scaling=none", "train.steps=30", "train.log_every=1", "run.seed=3",
)


def _assert_same_training(a, b):
    losses_a = [r["loss"] for r in metrics(a)]
    losses_b = [r["loss"] for r in metrics(b)]
    assert len(losses_a) == len(losses_b) == 30
    assert sum(losses_a[-5:]) < sum(losses_a[:5])  # it really trained
    for x, y in zip(losses_a, losses_b):
        assert abs(x - y) <= 1e-5 * abs(x)
    params_a = torch.load(a / "model.pt")
    params_b = torch.load(b / "model.pt")
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars", "lamb"])
def test_two_ranks_equal_one_rank_with_accumulation_and_one_big_micro_batch(run_dirs, optimizer):
    two_ranks = run_dirs("w2_m4")
    accumulated = run_dirs("w1_m4_a2")
    one_batch = run_dirs("w1_m8")
    opt = f"optim.name={optimizer}", "optim.weight_decay=0.01"
    s2 = train(two_ranks, *COMMON, *opt, "batch.global_size=8", "batch.micro_size=4", nproc=2)
    s1a = train(accumulated, *COMMON, *opt, "batch.global_size=8", "batch.micro_size=4")
    s1 = train(one_batch, *COMMON, *opt, "batch.global_size=8", "batch.micro_size=8")
    assert (s2["world_size"], s2["micro_batch"], s2["accum_steps"]) == (2, 4, 1)
    assert (s1a["world_size"], s1a["micro_batch"], s1a["accum_steps"]) == (1, 4, 2)
    assert (s1["world_size"], s1["micro_batch"], s1["accum_steps"]) == (1, 8, 1)
    _assert_same_training(two_ranks, accumulated)
    _assert_same_training(two_ranks, one_batch)


def test_two_ranks_with_accumulation_and_clipping_equal_one_rank(run_dirs):
    """Clipping acts on the global (all-reduced, accumulated) gradient, so it too is split-independent."""
    a, b = run_dirs("w2_m2_a2"), run_dirs("w1_m8_clip")
    clip = ("train.clip_grad_norm=0.05", "batch.global_size=8")
    train(a, *COMMON, *clip, "batch.micro_size=2", nproc=2)
    train(b, *COMMON, *clip, "batch.micro_size=8")
    assert all(r["grad_norm"] > 0.05 for r in metrics(a)[:5])  # clipping was active
    _assert_same_training(a, b)
