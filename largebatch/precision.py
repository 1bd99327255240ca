"""Precision policy: the autocast context, loss scaling for fp16, and the unscale → clip → step order."""

from __future__ import annotations

import contextlib

import torch


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all of `params`' gradients, as one multi-tensor pass (no host sync)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None])))


class Precision:
    def __init__(self, name: str, device: torch.device, init_scale: float = 65536.0) -> None:
        self.name = name
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_and_clip(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                         clip: float | None) -> torch.Tensor:
        """Unscale the (already all-reduced) gradients and clip them; returns the global norm before clipping."""
        self.scaler.unscale_(optimizer)
        if clip is not None:
            return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        return grad_norm(params)

    def step(self, optimizer: torch.optim.Optimizer, skip: bool) -> None:
        """Step unless `skip` (a non-finite gradient); the fp16 loss scale is updated either way."""
        if not skip:
            self.scaler.step(optimizer)
        self.scaler.update()
