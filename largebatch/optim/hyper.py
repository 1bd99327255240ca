"""The optimizer's per-step hyperparameters: one owner for the LR (and what follows the global batch with it).

A group's LR for the next step is its peak LR (at batch.global_size, by optim.scaling) × the LR schedule at the
examples of applied steps, counted in steps of batch.global_size (so skipped steps do not eat warmup and a
batch-size schedule moves through the LR schedule by examples) × the scaling rule's ratio between the current
global batch and batch.global_size. With optim.scale_beta2, β2 follows the global batch as well; with
optim.scale_weight_decay, so does each group's weight decay (scaling.weight_decay_factor).
"""

from __future__ import annotations

from typing import Any

import torch

from largebatch.config import OptimConfig
from largebatch.optim.scaling import (
    describe_peak_lr,
    describe_rule,
    peak_lr,
    scaling_rule,
    weight_decay_factor,
)
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
        self.rule = scaling_rule(cfg)
        """optim.scaling, auto resolved."""
        self.full_peak_lr = peak_lr(cfg.lr, full_batch, cfg.reference_batch, self.rule)
        self.peaks: list[dict[str, Any]] = [
            {key: value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups
        ]
        """Each group's hyperparameters as optim.build set them, what `set` scales: the LR at batch.global_size and
        the LR schedule's peak; β2 and weight decay as given, for optim.reference_batch."""

    def batch_ratio(self, global_batch: int) -> float:
        """The scaling rule's peak LR at `global_batch` over the one at batch.global_size."""
        cfg = self.cfg
        return peak_lr(cfg.lr, global_batch, cfg.reference_batch, self.rule) / self.full_peak_lr

    def peak_lr(self, global_batch: int) -> float:
        """The first group's peak LR at `global_batch` (what a batch change prints)."""
        return self.peaks[0]["lr"] * self.batch_ratio(global_batch)

    def weight_decays(self, global_batch: int) -> str:
        """The groups' nonzero weight decays at `global_batch` (what the start line and a batch change print)."""
        factor = weight_decay_factor(global_batch, self.cfg.reference_batch, self.rule)
        given = dict.fromkeys(p["weight_decay"] for p in self.peaks if p.get("weight_decay"))
        return ", ".join(f"{decay * factor:.6g}" for decay in given) or "0"

    def describe(self) -> str:
        """The peak LR at batch.global_size for the start line, saying how the scaling rule changed optim.lr (and
        optim.weight_decay, with optim.scale_weight_decay), and what optim.scaling=auto chose."""
        cfg = self.cfg
        parts = [describe_peak_lr(cfg.lr, self.full_batch, cfg.reference_batch, self.rule)]
        if cfg.scaling == "auto":
            parts.insert(0, describe_rule(cfg))
        if cfg.scale_weight_decay:
            parts.append(
                f"weight decay {self.weight_decays(cfg.reference_batch)} at reference {cfg.reference_batch} → "
                f"{self.weight_decays(self.full_batch)} at global {self.full_batch} "
                f"(optim.scale_weight_decay keeps batch/(lr·weight_decay))"
            )
        return "; ".join(parts)

    def describe_change(self, before: int, after: int) -> str:
        """What follows the global batch from `before` to `after`, for the batch change's line."""
        line = f"peak lr {self.peak_lr(before):.6g} → {self.peak_lr(after):.6g}"
        betas = next((p["betas"][1] for p in self.peaks if "betas" in p), None)
        if self.cfg.scale_beta2 and betas is not None:
            reference = self.cfg.reference_batch
            line += f"; β2 {betas ** (before / reference):.6g} → {betas ** (after / reference):.6g}"
        if self.cfg.scale_weight_decay:
            line += f"; weight decay {self.weight_decays(before)} → {self.weight_decays(after)}"
        return line

    def set(self, global_batch: int, applied_samples: int) -> None:
        """Set the hyperparameters of the next step, at `global_batch`, after `applied_samples` examples of
        applied steps."""
        position = applied_samples / self.full_batch  # in steps of batch.global_size
        lr_factor = self.schedule.factor(position) * self.batch_ratio(global_batch)
        beta2_power = global_batch / self.cfg.reference_batch
        decay_factor = weight_decay_factor(global_batch, self.cfg.reference_batch, self.rule)
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            group["lr"] = peak["lr"] * lr_factor
            if self.cfg.scale_beta2 and "betas" in peak:
                group["betas"] = (group["betas"][0], peak["betas"][1] ** beta2_power)
            if self.cfg.scale_weight_decay and "weight_decay" in peak:
                group["weight_decay"] = peak["weight_decay"] * decay_factor
