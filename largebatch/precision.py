"""Precision policy: the autocast context, loss scaling for fp16, and the unscale → clip → step order."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

MIN_LOSS_SCALE = 1.0
"""fp16: a loss scale driven below this by back-to-back overflows means the gradients are not finite at any
scale; such a step counts as non-finite (as DeepSpeed's min_loss_scale). Above it, overflow is routine."""


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all of `params`' gradients, as one multi-tensor pass (no host sync)."""
    return torch.linalg.vector_norm(
        torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None]))
    )


def clip_factor(
    norm: float | torch.Tensor, max_norm: float | None, scale: float = 1.0
) -> float | torch.Tensor:
    """What the gradients are multiplied by: `scale` × torch's clip_grad_norm_ coefficient min(1, max_norm / (norm +
    1e-6)), or `scale` alone without clipping; a tensor `norm` gives a tensor (no host sync), a float a float."""
    if max_norm is None:
        return scale
    ratio = max_norm / (norm + 1e-6)
    return scale * (
        torch.clamp(ratio, max=1.0) if isinstance(ratio, torch.Tensor) else min(1.0, ratio)
    )


@dataclass(frozen=True)
class StepOutcome:
    applied: bool
    """The optimizer updated the parameters (the LR schedule advances only then)."""
    nonfinite: bool
    """A non-finite loss, a non-finite gradient (fp32, bf16), or an fp16 loss scale under MIN_LOSS_SCALE."""
    grad_norm: float
    """The global gradient norm before clipping."""


class Precision:
    def __init__(
        self,
        name: str,
        device: torch.device,
        init_scale: float = 65536.0,
        scaler: type[torch.amp.GradScaler] = torch.amp.GradScaler,
    ) -> None:
        """`scaler`: the loss scaler's class (FSDP's gradients are shards: its scaler agrees on overflow over
        ranks)."""
        self.name = name
        self.device_type = device.type
        self.scaler = scaler(device.type, init_scale=init_scale, enabled=name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale (1 without one)."""
        return self.scaler.get_scale() if self.scaler.is_enabled() else 1.0

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale and record whether any is not finite (fp16; else nothing)."""
        self.scaler.unscale_(optimizer)

    def unscale_and_clip(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        clip: float | None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Unscale the (already all-reduced) gradients, multiply them by `scale` and clip them, in one multiply
        (torch's clip_grad_norm_ when `scale` is 1); returns the global norm of the scaled gradients before
        clipping."""
        self.unscale(optimizer)
        norm = grad_norm(params) if scale == 1.0 else grad_norm(params) * scale
        if clip is None and scale == 1.0:
            return norm
        torch._foreach_mul_(
            [p.grad for p in params if p.grad is not None], clip_factor(norm, clip, scale)
        )
        return norm

    def step(self, optimizer: torch.optim.Optimizer, loss: float, norm: float) -> StepOutcome:
        """Step the optimizer if the step is usable. Under fp16 the GradScaler owns overflow: it skips the update
        and halves the scale, which is routine and not a non-finite step unless the scale falls under the floor."""
        finite_loss = math.isfinite(loss)
        if not self.scaler.is_enabled():
            applied = finite_loss and math.isfinite(norm)
            if applied:
                optimizer.step()
            return StepOutcome(applied, not applied, norm)
        before = self.scaler.get_scale()
        if finite_loss:
            self.scaler.step(optimizer)
        self.scaler.update()
        after = self.scaler.get_scale()
        return StepOutcome(
            finite_loss and after >= before, not finite_loss or after < MIN_LOSS_SCALE, norm
        )

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss scale; a checkpoint from another precision (no scaler state, or none wanted) starts
        afresh."""
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)
