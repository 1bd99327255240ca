"""The optimizer's per-step hyperparameters: one owner for the LR (and what follows the global batch with it).

A group's LR for the next step is its peak LR (at batch.global_size, by optim.scaling) × the LR schedule at the
examples of applied steps, counted in steps of batch.global_size (so skipped steps do not eat warmup and a
batch-size schedule moves through the LR schedule by examples) × the scaling rule's ratio between the current
global batch and batch.global_size. With optim.scale_beta2, β2 follows the global batch as well.
"""

from __future__ import annotations

from typing import Any

import torch

from largebatch.config import OptimConfig
from largebatch.optim.scaling import describe_peak_lr, peak_lr
from largebatch.optim.schedules import Schedule


class Hyperparameters:
    """Sets every param group's LR (and β2) for the next step from the global batch and the schedule position."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: OptimConfig,
        schedule: Schedule,
        full_batch: int,
    ) -> None:
        """`optimizer`'s groups hold their peak LRs at `full_batch` (batch.global_size), as optim.build left them."""
        self.optimizer = optimizer
        self.cfg = cfg
        self.schedule = schedule
        self.full_batch = full_batch
        self.full_peak_lr = peak_lr(cfg.lr, full_batch, cfg.reference_batch, cfg.scaling)
        self.peaks: list[dict[str, Any]] = [
            {key: value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups
        ]
        """Each group's hyperparameters as optim.build set them (at batch.global_size and the LR schedule's peak):
        what `set` scales."""

    def batch_ratio(self, global_batch: int) -> float:
        """The scaling rule's peak LR at `global_batch` over the one at batch.global_size."""
        cfg = self.cfg
        return peak_lr(cfg.lr, global_batch, cfg.reference_batch, cfg.scaling) / self.full_peak_lr

    def peak_lr(self, global_batch: int) -> float:
        """The first group's peak LR at `global_batch` (what a batch change prints)."""
        return self.peaks[0]["lr"] * self.batch_ratio(global_batch)

    def describe(self) -> str:
        """The peak LR at batch.global_size for the start line, saying how the scaling rule changed optim.lr."""
        cfg = self.cfg
        return describe_peak_lr(cfg.lr, self.full_batch, cfg.reference_batch, cfg.scaling)

    def set(self, global_batch: int, applied_samples: int) -> None:
        """Set the hyperparameters of the next step, at `global_batch`, after `applied_samples` examples of
        applied steps."""
        position = applied_samples / self.full_batch  # in steps of batch.global_size
        lr_factor = self.schedule.factor(position) * self.batch_ratio(global_batch)
        beta2_power = global_batch / self.cfg.reference_batch
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak["lr"] * lr_factor
            if self.cfg.scale_beta2 and "betas" in peak:
                group["betas"] = (group["betas"][0], peak["betas"][1] ** beta2_power)
