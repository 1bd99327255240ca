"""LR multipliers over optimizer steps: linear warmup to the peak, then a decay shape (schedule.name).

Each decay is a function of (cfg, step, total_steps, progress) → factor of the peak LR, where progress runs from 0
to 1 over the steps after warmup; registry.LR_SCHEDULES names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from largebatch.config import ScheduleConfig
from largebatch.registry import LR_SCHEDULES


@dataclass(frozen=True)
class Schedule:
    """`factor(step)` scales the peak LR; pure and picklable, so LambdaLR's state is just the step."""

    cfg: ScheduleConfig
    total_steps: int
    warmup_steps: int

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return LR_SCHEDULES[self.cfg.name].load()(self.cfg, step, self.total_steps, progress)


def constant(cfg: ScheduleConfig, step: int, total_steps: int, progress: float) -> float:
    return 1.0


def cosine(cfg: ScheduleConfig, step: int, total_steps: int, progress: float) -> float:
    """Half a cosine from the peak down to schedule.min_lr_ratio (Loshchilov & Hutter 2017)."""
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def poly(cfg: ScheduleConfig, step: int, total_steps: int, progress: float) -> float:
    """(1 − progress)^power down to schedule.min_lr_ratio (LARS uses power 2)."""
    floor = cfg.min_lr_ratio
    return floor + (1 - floor) * (1 - progress) ** cfg.power


def step_wise(cfg: ScheduleConfig, step: int, total_steps: int, progress: float) -> float:
    """× schedule.gamma at each milestone passed (fractions of training)."""
    passed = sum(step >= m * total_steps for m in cfg.milestones)
    return cfg.gamma**passed
