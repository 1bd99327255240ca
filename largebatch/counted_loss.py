"""The counted loss's normalisation: a step's gradient is that of Σ loss terms ÷ the count of terms in the whole
global batch, whatever its split into ranks and micro-batches (torchtitan's rule; padding counts nothing).

The count is known only after the step's one all-reduce, so the divisor is applied in two parts:
1. `micro_loss`: each micro-step back-propagates its summed loss ÷ the per-rank share of examples, the same
   divisor on every rank, so the synced gradient (the mean over ranks of the sum over micro-steps) is
   Σ terms' gradients ÷ global batch.
2. `normalise`: after the all-reduce of (loss sum, count), the engine rescales that gradient by
   global batch ÷ count (by zero when the count is 0: a global batch of padding only makes no update); the step's
   loss is loss sum ÷ count.
The noise scale's small batch is a gradient from before the reduction (one rank's, or on one process the first
micro-batch's), Σ its terms' gradients ÷ per-rank share: `small_batch_sq` turns its squared norm into that of the
mean over its own terms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from largebatch.batch import BatchPlan

if TYPE_CHECKING:
    from largebatch.engine import Engine


def micro_loss(total: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
    """What a micro-step back-propagates: its sum of loss terms ÷ the per-rank share of examples."""
    return total / plan.per_rank


def normalise(engine: Engine, plan: BatchPlan, loss_sum: float, count: float) -> float:
    """Turn the synced gradient Σ terms ÷ global batch into Σ terms ÷ count; returns the step's mean loss."""
    if count == 0:  # a global batch of padding only: no update (counted as a non-finite step)
        engine.scale_gradients(0.0)
        return math.nan
    factor = plan.global_batch / count
    if factor != 1.0:
        engine.scale_gradients(factor)
    return loss_sum / count


def small_batch_sq(grad_sq: float, plan: BatchPlan, count: float) -> float:
    """The squared norm of a gradient from before the reduction (Σ terms ÷ per-rank share), as the mean over its
    own `count` terms; NaN (no measurement) when it has none."""
    return grad_sq * (plan.per_rank / count) ** 2 if count else math.nan
