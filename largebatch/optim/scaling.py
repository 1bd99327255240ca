"""LR scaling from a reference batch (Goyal et al. 2017 linear rule; Krizhevsky 2014 sqrt rule)."""

from __future__ import annotations

import math


def peak_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """lr × (global / reference) for `linear`, lr × √(global / reference) for `sqrt`, lr for `none`."""
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]
