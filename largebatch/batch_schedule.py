"""How the global batch changes during a run (`batch.schedule`).

- `constant`: batch.global_size throughout.
- `ramp`: linear in examples trained from batch.start_size to batch.global_size over batch.ramp_samples, as
  Megatron-LM's `--rampup-batch-size` (Merrill et al. 2025: a batch-size warmup needs fewer steps to the same loss).
- `gns`: the smoothed gradient noise scale B_noise (McCandlish et al. 2018: the batch where steps and examples
  cost equally), from batch.start_size, never shrinking, at most doubling per change, capped at batch.global_size,
  as AdaptDL grows its batch; it waits until the noise scale's average spans its window.
- `steps`: the global batch from each threshold of batch.thresholds on ("0:64 200k:128 1M:256": examples, or tokens
  with batch.threshold_unit=tokens), each size an integer multiple of the one before, as OLMo-core's batch-size
  warmup and Megatron-LM's `--step-batch-size-schedule` (Merrill et al. 2025: 43 % fewer steps on OLMo 1B). The
  first step that starts with at least a threshold's examples trained on takes its size.

Every size is a multiple of world × micro-batch: a change only changes accumulation, at a step boundary, so the
memory per micro-step stays the one the run started with. registry.BATCH_SCHEDULES names the classes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from largebatch.batch import BatchPlan, plan
from largebatch.errors import UserError
from largebatch.registry import BATCH_SCHEDULES

if TYPE_CHECKING:
    from largebatch.config import BatchConfig, Config


class BatchSchedule(Protocol):
    @staticmethod
    def of(cfg: Config, final: int, quantum: int) -> BatchSchedule:
        """The schedule `cfg` asks for, up to the global batch `final`, over multiples of `quantum`."""

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        """The global batch of the next step, from the current one, the examples trained on so far and the
        smoothed noise scale (None until measured)."""

    def describe(self) -> str:
        """How the batch changes, for the start line and `largebatch plan`."""


@dataclass(frozen=True)
class Constant:
    final: int

    @staticmethod
    def of(cfg: Config, final: int, quantum: int) -> Constant:
        return Constant(final)

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        return self.final

    def describe(self) -> str:
        return f"{self.final} throughout"


@dataclass(frozen=True)
class Ramp:
    start: int
    final: int
    ramp_samples: int
    quantum: int

    @staticmethod
    def of(cfg: Config, final: int, quantum: int) -> Ramp:
        return Ramp(cfg.batch.start_size, final, cfg.batch.ramp_samples, quantum)

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        if samples >= self.ramp_samples:
            return self.final
        exact = self.start + (self.final - self.start) * samples / self.ramp_samples
        return max(self.start, int(exact // self.quantum) * self.quantum)

    def describe(self) -> str:
        return (
            f"linear from {self.start} to {self.final} over {self.ramp_samples} examples, "
            f"in multiples of {self.quantum}"
        )


@dataclass(frozen=True)
class FollowNoise:
    start: int
    final: int
    quantum: int

    @staticmethod
    def of(cfg: Config, final: int, quantum: int) -> FollowNoise:
        return FollowNoise(cfg.batch.start_size, final, quantum)

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        if noise_scale is None or not math.isfinite(noise_scale):
            return current
        return min(
            self.final, 2 * current, max(current, int(noise_scale // self.quantum) * self.quantum)
        )

    def describe(self) -> str:
        return (
            f"follows the noise scale from {self.start} up to {self.final}, at most doubling per change, "
            f"in multiples of {self.quantum}"
        )


SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}
"""batch.thresholds' count suffixes (decimal, as OLMo-core and Megatron-LM write token counts)."""
THRESHOLD = re.compile(r"(\d+(?:\.\d+)?)([kMG]?):(\d+)")


def parse_thresholds(text: str) -> tuple[tuple[int, int], ...]:
    """(count, global batch) pairs of batch.thresholds ("0:64 200k:128 1M:256", space or comma separated), checked:
    counts increasing from 0, each size an integer multiple (2×, 3×, ...) of the one before."""
    pairs = []
    for item in text.replace(",", " ").split():
        match = THRESHOLD.fullmatch(item)
        count = match and float(match[1]) * SUFFIXES[match[2]]
        if not match or not count.is_integer() or int(match[3]) < 1:
            raise UserError(
                f"batch.thresholds: {item!r} is not count:size (a count of examples with an optional "
                f"k, M or G suffix, a positive global batch), e.g. '0:64 200k:128 1M:256'"
            )
        pairs.append((int(count), int(match[3])))
    if not pairs or pairs[0][0] != 0:
        raise UserError(
            f"batch.thresholds={text!r} must start at 0 (the first step's global batch), "
            f"e.g. '0:64 200k:128 1M:256'"
        )
    for (before, small), (after, large) in zip(pairs, pairs[1:]):
        if after <= before:
            raise UserError(
                f"batch.thresholds={text!r}: {after} after {before}; make them increase"
            )
        if large <= small or large % small:
            raise UserError(
                f"batch.thresholds={text!r}: {small} → {large} is not an integer-factor change; make each "
                f"size a multiple (2×, 3×, ...) of the one before, e.g. {small} → {2 * small}"
            )
    return tuple(pairs)


@dataclass(frozen=True)
class Steps:
    changes: tuple[tuple[int, int], ...]
    """(examples trained on, global batch from there on), from (0, the first size)."""
    tokens: tuple[int, ...] | None = None
    """The thresholds as given in tokens, under batch.threshold_unit=tokens (for `describe`)."""

    @staticmethod
    def of(cfg: Config, final: int, quantum: int) -> Steps:
        pairs = parse_thresholds(cfg.batch.thresholds)
        if cfg.batch.threshold_unit == "examples":
            return Steps(pairs)
        unit = cfg.data.context  # registry.FIXED_TOKENS: every example holds data.context tokens
        return Steps(
            tuple((-(-count // unit), size) for count, size in pairs), tuple(c for c, _ in pairs)
        )

    def size(self, current: int, samples: int, noise_scale: float | None) -> int:
        return next(size for start, size in reversed(self.changes) if samples >= start)

    def describe(self) -> str:
        tokens = (
            [f" ({count} tokens)" for count in self.tokens]
            if self.tokens
            else [""] * len(self.changes)
        )
        return "; ".join(
            f"{size} from {start} examples{given}"
            for (start, size), given in zip(self.changes, tokens)
        )


def build(cfg: Config, final: BatchPlan) -> BatchSchedule:
    """The schedule `cfg` asks for, over sizes that are multiples of `final`'s world × micro-batch."""
    quantum = final.world_size * final.micro_batch
    return BATCH_SCHEDULES[cfg.batch.schedule].load().of(cfg, final.global_batch, quantum)


def start_size(cfg: BatchConfig) -> int | None:
    """The first step's global batch under a changing schedule: batch.start_size, or steps' first size."""
    return parse_thresholds(cfg.thresholds)[0][1] if cfg.schedule == "steps" else cfg.start_size


def first_size(cfg: BatchConfig, final: BatchPlan) -> int:
    return final.global_batch if cfg.schedule == "constant" else start_size(cfg)


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
    if cfg.schedule == "steps":
        return _steps_micro_size(cfg, world_size)
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


def _steps_micro_size(cfg: BatchConfig, world_size: int) -> int:
    """steps: batch.micro_size, else the first size's per-rank share; every size a multiple of world × micro-batch
    and the last one batch.global_size (the run's length and optim.lr's scaling count in it)."""
    sizes = [size for _, size in parse_thresholds(cfg.thresholds)]
    if sizes[-1] != cfg.global_size:
        raise UserError(
            f"batch.thresholds ends at a global batch of {sizes[-1]} but batch.global_size={cfg.global_size}: "
            f"set batch.global_size={sizes[-1]} (the last size)"
        )
    micro = cfg.micro_size or sizes[0] // world_size
    quantum = world_size * micro
    if not quantum or any(size % quantum for size in sizes):
        raise UserError(
            f"batch.thresholds sizes {sizes} must be multiples of world × micro-batch = {world_size} × {micro}; "
            f"change them or batch.micro_size"
        )
    return micro
