"""The global-batch contract end to end: the split of a global batch over processes and micro-steps does not change
training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import metrics, train_in_one_job

COMMON = (
    "data.name=synthetic",
    "data.size=512",
    "data.shape=[16]",
    "data.label_noise=0.1",
    "model.name=mlp",
    "model.width=32",
    "model.depth=2",
    "train.precision=fp32",
    "optim.lr=0.05",
    "optim.scaling=none",
    "train.steps=30",
    "train.log_every=1",
    "run.seed=3",
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


OPTIMIZERS = ["sgd", "adamw", "lars", "lamb"]
CLIP = ("train.clip_grad_norm=0.05", "batch.global_size=8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Every split of every comparison: the 2-process runs in one torchrun job, the 1-process runs in another."""
    base = tmp_path_factory.mktemp("equivalence")
    two, one = (
        {"clip-w2_m2_a2": (*COMMON, *CLIP, "batch.micro_size=2")},
        {"clip-w1_m8": (*COMMON, *CLIP, "batch.micro_size=8")},
    )
    for optimizer in OPTIMIZERS:
        opt = (*COMMON, f"optim.name={optimizer}", "optim.weight_decay=0.01", "batch.global_size=8")
        two[f"{optimizer}-w2_m4"] = (*opt, "batch.micro_size=4")
        one[f"{optimizer}-w1_m4_a2"] = (*opt, "batch.micro_size=4")
        one[f"{optimizer}-w1_m8"] = (*opt, "batch.micro_size=8")
    train_in_one_job(base, two, nproc=2)
    train_in_one_job(base, one, nproc=1)
    return base


def _split(run: Path) -> tuple[int, int, int]:
    summary = json.loads((run / "summary.json").read_text())
    return summary["world_size"], summary["micro_batch"], summary["accum_steps"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_ranks_equal_one_rank_with_accumulation_and_one_big_micro_batch(trained, optimizer):
    two_ranks, accumulated, one_batch = (
        trained / f"{optimizer}-{split}" for split in ("w2_m4", "w1_m4_a2", "w1_m8")
    )
    assert _split(two_ranks) == (2, 4, 1)
    assert _split(accumulated) == (1, 4, 2)
    assert _split(one_batch) == (1, 8, 1)
    _assert_same_training(two_ranks, accumulated)
    _assert_same_training(two_ranks, one_batch)


def test_two_ranks_with_accumulation_and_clipping_equal_one_rank(trained):
    """Clipping acts on the global (all-reduced, accumulated) gradient, so it too is split-independent."""
    a, b = trained / "clip-w2_m2_a2", trained / "clip-w1_m8"
    assert all(r["grad_norm"] > 0.05 for r in metrics(a)[:5])  # clipping was active
    _assert_same_training(a, b)
