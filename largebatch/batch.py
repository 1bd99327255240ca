"""The global-batch contract: global batch = world_size × micro_batch × accum_steps.

Everything that depends on how a step's examples are split across processes and
micro-steps is derived here, once, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from largebatch.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split: per process, then per micro-step."""

    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int

    @property
    def per_rank(self) -> int:
        """Examples one process sees per optimizer step."""
        return self.micro_batch * self.accum_steps

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} = world {self.world_size} × "
            f"micro {self.micro_batch} × accum {self.accum_steps}"
        )


def plan(
    world_size: int,
    global_size: int | None = None,
    micro_size: int | None = None,
    accum_steps: int | None = None,
) -> BatchPlan:
    """Derive the missing one of global/micro/accum from the others and check they agree.

    With only `global_size`, accumulation is 1 and the micro-batch is the per-rank share.
    With only `micro_size`, accumulation is 1 (or `accum_steps`) and the global batch follows.
    """
    for key, value in (
        ("global_size", global_size),
        ("micro_size", micro_size),
        ("accum_steps", accum_steps),
    ):
        if value is not None and value < 1:
            raise UserError(f"batch.{key}={value} must be a positive integer")
    if world_size < 1:
        raise UserError(f"world size {world_size} must be at least 1; check WORLD_SIZE or --nproc")

    if global_size is None:
        if micro_size is None:
            raise UserError(
                "the batch plan needs batch.global_size or batch.micro_size; set at least one"
            )
        accum = accum_steps or 1
        return BatchPlan(world_size * micro_size * accum, micro_size, accum, world_size)

    if global_size % world_size:
        raise UserError(
            f"batch.global_size={global_size} is not divisible by world_size={world_size}; "
            f"use a multiple of {world_size}"
        )
    per_rank = global_size // world_size
    if micro_size is None:
        accum = accum_steps or 1
        if per_rank % accum:
            raise UserError(
                f"batch.global_size={global_size} is not divisible by world_size × accum_steps = "
                f"{world_size} × {accum}; use a multiple of {world_size * accum} or set batch.micro_size"
            )
        return BatchPlan(global_size, per_rank // accum, accum, world_size)

    if per_rank % micro_size:
        raise UserError(
            f"batch.global_size={global_size} is not divisible by world_size × micro_size = "
            f"{world_size} × {micro_size}; use a multiple of {world_size * micro_size} or change batch.micro_size"
        )
    accum = per_rank // micro_size
    if accum_steps is not None and accum_steps != accum:
        raise UserError(
            f"batch.accum_steps={accum_steps} disagrees with global {global_size} / "
            f"(world {world_size} × micro {micro_size}) = {accum}; drop batch.accum_steps to derive it"
        )
    return BatchPlan(global_size, micro_size, accum, world_size)


def steps_per_epoch(dataset_size: int, batch_plan: BatchPlan) -> int:
    """⌊dataset size / global batch⌋: an epoch drops the remainder so every step has a full global batch."""
    if dataset_size < batch_plan.global_batch:
        raise UserError(
            f"batch.global_size={batch_plan.global_batch} is larger than the training set "
            f"({dataset_size} examples); lower batch.global_size"
        )
    return dataset_size // batch_plan.global_batch


Position = tuple[int, int]
"""(epoch, offset): where the next global batch starts in that epoch's permutation of the training set."""


def locate(position: Position, size: int, dataset_size: int) -> Position:
    """(epoch, start) of the global batch of `size` taken at `position`: an epoch's tail shorter than `size` is
    dropped, so no batch spans two epochs and no example repeats within one, whatever the sizes before it."""
    epoch, offset = position
    return (epoch + 1, 0) if offset + size > dataset_size else (epoch, offset)


def advance(position: Position, size: int, dataset_size: int) -> Position:
    """The position after taking a global batch of `size` at `position`."""
    epoch, start = locate(position, size, dataset_size)
    return epoch, start + size


class GlobalBatchSampler:
    """Yields this rank's micro-batches of indices for `steps` global batches of one plan, taken from `position` on.

    Each epoch is one seeded permutation of the dataset, consumed batch after batch (a tail too short for the
    next batch is dropped): with a constant global batch, ⌊n / global⌋ batches per epoch. Within a global batch,
    rank r takes the r-th contiguous share of `per_rank` examples and micro-step m the m-th `micro_batch` of that
    share, so the union over ranks and micro-steps at step t does not depend on the split. A batch-size schedule
    starts a new sampler at each change, from the position the last one reached.

    With `draws`, each index comes as (seed, epoch, index), from which an epoch-aware dataset seeds that
    example's random augmentation: the same crop at step t on any topology and with any worker count.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_plan: BatchPlan,
        rank: int,
        seed: int,
        steps: int,
        position: Position = (0, 0),
        draws: bool = False,
    ) -> None:
        steps_per_epoch(dataset_size, batch_plan)  # the global batch must fit in the training set
        self.dataset_size = dataset_size
        self.plan = batch_plan
        self.rank = rank
        self.seed = seed
        self.steps = steps
        self.position = position
        self.draws = draws
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            self._epoch_order = (
                epoch,
                np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size),
            )
        return self._epoch_order[1]

    def global_batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """(epoch, all indices) of each global batch in turn."""
        position, size = self.position, self.plan.global_batch
        for _ in range(self.steps):
            epoch, start = locate(position, size, self.dataset_size)
            position = (epoch, start + size)
            yield epoch, self._order(epoch)[start : start + size]

    def __iter__(self) -> Iterator[list[int] | list[tuple[int, int, int]]]:
        share, micro = self.plan.per_rank, self.plan.micro_batch
        for epoch, indices in self.global_batches():
            mine = indices[self.rank * share : (self.rank + 1) * share]
            for m in range(self.plan.accum_steps):
                chunk = mine[m * micro : (m + 1) * micro].tolist()
                yield [(self.seed, epoch, i) for i in chunk] if self.draws else chunk

    def __len__(self) -> int:
        return self.steps * self.plan.accum_steps
