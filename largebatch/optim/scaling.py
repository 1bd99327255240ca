"""LR scaling from a reference batch (Goyal et al. 2017 linear rule; Krizhevsky 2014 sqrt rule)."""

from __future__ import annotations

import math


def peak_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """lr × (global / reference) for `linear`, lr × √(global / reference) for `sqrt`, lr for `none`."""
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def describe_peak_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> str:
    """The peak LR for the start line, saying how scaling changed the given LR when it did."""
    lr = peak_lr(base_lr, global_batch, reference_batch, rule)
    if lr == base_lr:
        return f"peak lr {lr:.6g}"
    return (
        f"optim.lr {base_lr:g} at reference {reference_batch} → {lr:.6g} at global {global_batch} "
        f"(optim.scaling={rule})"
    )
