"""The global-batch contract: plan algebra and the sampler's topology independence."""

from __future__ import annotations

import pytest

from largebatch.batch import BatchPlan, GlobalBatchSampler, advance, plan, steps_per_epoch
from largebatch.errors import UserError


def test_global_alone_gives_per_rank_micro_batch_and_no_accumulation():
    assert plan(4, global_size=1024) == BatchPlan(1024, 256, 1, 4)


def test_global_and_micro_derive_accumulation():
    assert plan(2, global_size=1024, micro_size=64) == BatchPlan(1024, 64, 8, 2)


def test_global_and_accum_derive_micro_batch():
    assert plan(2, global_size=1024, accum_steps=4) == BatchPlan(1024, 128, 4, 2)


def test_micro_and_accum_derive_global_batch():
    assert plan(8, micro_size=32, accum_steps=2) == BatchPlan(512, 32, 2, 8)


def test_all_three_must_agree():
    assert plan(2, 64, 8, 4).accum_steps == 4
    with pytest.raises(UserError, match="accum_steps=3 disagrees"):
        plan(2, 64, 8, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        ((3, 1000, None, None), "not divisible by world_size=3"),
        ((2, 1000, 64, None), "world_size × micro_size = 2 × 64; use a multiple of 128"),
        ((2, 1000, None, 3), "world_size × accum_steps"),
        ((2, None, None, None), "needs batch.global_size or batch.micro_size"),
        ((2, 0, None, None), "must be a positive integer"),
        ((2, 64, -1, None), "must be a positive integer"),
    ],
)
def test_impossible_plans_say_what_to_change(args, message):
    with pytest.raises(UserError, match=message.replace("×", ".").replace("(", r"\(")):
        plan(*args)


def test_global_batch_larger_than_dataset_is_an_error():
    with pytest.raises(UserError, match="larger than the training set"):
        steps_per_epoch(100, plan(1, 128))


def _global_batches(sampler_plan: BatchPlan, n: int, steps: int, seed: int = 7) -> list[list[int]]:
    """The union over ranks of each step's indices, in rank-then-micro-step order."""
    per_step: list[list[int]] = [[] for _ in range(steps)]
    for rank in range(sampler_plan.world_size):
        micro = list(GlobalBatchSampler(n, sampler_plan, rank, seed, steps))
        assert len(micro) == steps * sampler_plan.accum_steps
        for i, indices in enumerate(micro):
            assert len(indices) == sampler_plan.micro_batch
            per_step[i // sampler_plan.accum_steps].extend(indices)
    return per_step


def test_ranks_and_micro_steps_are_disjoint_within_a_step():
    for step in _global_batches(plan(4, 64, 8), n=1000, steps=20):
        assert len(step) == len(set(step)) == 64


def test_an_epoch_covers_every_example_once_except_the_dropped_remainder():
    p = plan(2, 100, 25)
    n = 1030
    steps = steps_per_epoch(n, p)
    seen = [i for step in _global_batches(p, n, steps) for i in step]
    assert len(seen) == len(set(seen)) == steps * 100 == 1000


def test_the_examples_at_each_step_do_not_depend_on_topology():
    n, steps = 500, 12  # 12 steps > 7 per epoch, so the epoch boundary is crossed too
    reference = [sorted(s) for s in _global_batches(plan(1, 64, 64), n, steps)]
    for topology in (plan(2, 64, 32), plan(1, 64, 8), plan(4, 64, 4), plan(2, 64, 8)):
        assert [sorted(s) for s in _global_batches(topology, n, steps)] == reference


def test_each_epoch_is_a_new_permutation_and_the_seed_matters():
    p = plan(1, 50)
    batches = [list(b) for _, b in GlobalBatchSampler(100, p, 0, 0, 4).global_batches()]
    assert batches[0] != batches[2]
    assert [list(b) for _, b in GlobalBatchSampler(100, p, 0, 1, 4).global_batches()][0] != batches[
        0
    ]


def test_starting_mid_run_yields_the_same_tail():
    p = plan(2, 32, 8)
    full = list(GlobalBatchSampler(300, p, 1, 3, 20))
    position = (0, 0)
    for _ in range(13):
        position = advance(position, p.global_batch, 300)
    tail = list(GlobalBatchSampler(300, p, 1, 3, 7, position))
    assert tail == full[13 * p.accum_steps :]
