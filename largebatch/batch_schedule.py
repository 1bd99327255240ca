"""How the global batch changes during a run (`batch.schedule`).

- `constant`: batch.global_size throughout.
- `ramp`: linear in examples trained from batch.start_size to batch.global_size over batch.ramp_samples, as
  Megatron-LM's `--rampup-batch-size` (Merrill et al. 2025: a batch-size warmup needs fewer steps to the same loss).
- `gns`: the smoothed gradient noise scale B_noise (McCandlish et al. 2018: the batch where steps and examples
  cost equally), from batch.start_size, never shrinking, at most doubling per change, capped at batch.global_size,
  as AdaptDL grows its batch; it waits until the noise scale's average spans its window.

Every size is a multiple of world × micro-batch: a change only changes accumulation, at a step boundary, so the
memory per micro-step stays the one the run started with. registry.BATCH_SCHEDULES names the classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from largebatch.batch import BatchPlan, plan
from largebatch.errors import UserError
from largebatch.registry import BATCH_SCHEDULES

if TYPE_CHECKING:
    from largebatch.config import BatchConfig


class BatchSchedule(Protocol):
    @staticmethod
    def of(cfg: BatchConfig, final: int, quantum: int) -> BatchSchedule:
        """The schedule `cfg` asks for, up to the global batch `final`, over multiples of `quantum`."""

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        """The global batch of the next step, from the current one, the examples trained on so far and the
        smoothed noise scale (None until measured)."""


@dataclass(frozen=True)
class Constant:
    final: int

    @staticmethod
    def of(cfg: BatchConfig, final: int, quantum: int) -> Constant:
        return Constant(final)

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        return self.final


@dataclass(frozen=True)
class Ramp:
    start: int
    final: int
    ramp_samples: int
    quantum: int

    @staticmethod
    def of(cfg: BatchConfig, final: int, quantum: int) -> Ramp:
        return Ramp(cfg.start_size, final, cfg.ramp_samples, quantum)

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        if samples >= self.ramp_samples:
            return self.final
        exact = self.start + (self.final - self.start) * samples / self.ramp_samples
        return max(self.start, int(exact // self.quantum) * self.quantum)


@dataclass(frozen=True)
class FollowNoise:
    start: int
    final: int
    quantum: int

    @staticmethod
    def of(cfg: BatchConfig, final: int, quantum: int) -> FollowNoise:
        return FollowNoise(cfg.start_size, final, quantum)

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        if noise_scale is None or not math.isfinite(noise_scale):
            return current
        return min(
            self.final, 2 * current, max(current, int(noise_scale // self.quantum) * self.quantum)
        )


def build(cfg: BatchConfig, final: BatchPlan) -> BatchSchedule:
    """The schedule `cfg` asks for, over sizes that are multiples of `final`'s world × micro-batch."""
    quantum = final.world_size * final.micro_batch
    return BATCH_SCHEDULES[cfg.schedule].load().of(cfg, final.global_batch, quantum)


def first_size(cfg: BatchConfig, final: BatchPlan) -> int:
    return final.global_batch if cfg.schedule == "constant" else cfg.start_size


def at(final: BatchPlan, size: int) -> BatchPlan:
    """The plan for a global batch of `size` on `final`'s world and micro-batch (a resume at another world size
    rounds a size it cannot split down to the nearest it can)."""
    quantum = final.world_size * final.micro_batch
    if size >= final.global_batch:
        return final
    return plan(final.world_size, max(quantum, size // quantum * quantum), final.micro_batch)


def micro_size(cfg: BatchConfig, world_size: int) -> int | None:
    """The micro-batch a changing schedule keeps: batch.micro_size, else the start size's per-rank share."""
    if cfg.schedule == "constant":
        return None if cfg.micro_size == "auto" else cfg.micro_size
    if cfg.micro_size == "auto":
        raise UserError(
            f"batch.schedule={cfg.schedule} changes accumulation, not the micro-batch: set batch.micro_size "
            f"to a number, or use batch.schedule=constant with micro_size=auto"
        )
    if cfg.start_size is None or cfg.global_size is None:
        raise UserError(
            f"batch.schedule={cfg.schedule} grows the global batch from batch.start_size to "
            f"batch.global_size: set both"
        )
    if cfg.schedule == "ramp" and not cfg.ramp_samples:
        raise UserError(
            "batch.schedule=ramp needs batch.ramp_samples, the examples over which the batch grows"
        )
    micro = cfg.micro_size or cfg.start_size // world_size
    quantum = world_size * micro
    if not quantum or cfg.start_size % quantum or cfg.start_size > cfg.global_size:
        raise UserError(
            f"batch.start_size={cfg.start_size} must be a multiple of world × micro-batch = {world_size} × "
            f"{micro} and at most batch.global_size={cfg.global_size}"
        )
    if cfg.schedule == "gns" and world_size == 1 and cfg.start_size < 2 * micro:
        raise UserError(
            "batch.schedule=gns on one process measures the noise scale across micro-batches: set "
            "batch.start_size to at least 2 × batch.micro_size"
        )
    return micro
