"""LR multipliers over optimizer steps: linear warmup to the peak, then a decay shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

from largebatch.config import ScheduleConfig


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
        floor = self.cfg.min_lr_ratio
        if self.cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.cfg.name == "poly":
            return floor + (1 - floor) * (1 - progress) ** self.cfg.power
        if self.cfg.name == "step":
            passed = sum(step >= m * self.total_steps for m in self.cfg.milestones)
            return self.cfg.gamma**passed
        return 1.0
