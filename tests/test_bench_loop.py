"""`largebatch bench loop`'s baselines stay what the trainer is measured against: their sources and jobs are pinned."""

from __future__ import annotations

import hashlib
import inspect

import pytest

from largebatch.bench import loop

PINNED = {
    "ddp": "95a267a49ed6f062f1c451da6f59b091c8e66607b1b1db1294bcbdc581dfb534",
    "fsdp": "f927270d107522741bf5aaa06e381e34db4a706970f668b7212fbf286d5e1f92",
    "gpt": "f5df75a6c738d8dae0daac514cae9e59c2562206d4221a2dae665701a38563a5",
}
"""sha256 of each hand-written loop's source. Change one only with a reason in docs/benchmarks.md: a faster trainer is
the goal, a slower baseline is not."""
JOBS = {
    "CONFIG": "836e2cd9e775d5b02113f394880a854179622f08a6bd8f6397574da182d5c05d",
    "GPT_CONFIG": "364a181aa61c883fed12fac3face61aea151e17fd6cec6c413d9f065cc5ade1b",
}
"""sha256 of the jobs both sides train (the overrides, one per line)."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_hand_written_loop_source_is_pinned(name: str) -> None:
    assert sha256(inspect.getsource(loop.BASELINES[name])) == PINNED[name]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_benchmark_jobs_are_pinned(name: str) -> None:
    assert sha256("\n".join(getattr(loop, name))) == JOBS[name]


def test_every_compared_loop_has_a_baseline_and_a_goal() -> None:
    assert set(loop.BASELINES) == set(loop.GOALS) == {"ddp", "fsdp", "gpt", "ddp-clip", "fsdp-clip"}
    for name in loop.BASELINES:
        hand, trainer = [overrides for _, overrides in loop.LOOPS[name].values()]
        assert hand is None and isinstance(trainer, tuple)
        assert (loop.CLIP[0] in trainer) == name.endswith("-clip")


def test_clipping_clips_each_sgd_step_of_a_hand_written_loop_and_only_inside() -> None:
    import torch

    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.tensor([30.0, 40.0, 0.0])  # norm 50
    opt = torch.optim.SGD([weight], lr=1.0)
    with loop.clipping(1.0):
        opt.step()
    assert weight.detach().tolist() == pytest.approx([-0.6, -0.8, 0.0])
    weight.grad = torch.tensor([30.0, 40.0, 0.0])
    opt.step()  # unpatched again
    assert weight.detach().tolist() == pytest.approx([-30.6, -40.8, 0.0])


def test_spread_reports_median_quartiles_and_range() -> None:
    line = loop.spread([0.97, 0.99, 1.0, 1.01, 1.05])
    assert line == "per repeat: median 1.000, quartiles 0.990–1.010, range 0.970–1.050"
