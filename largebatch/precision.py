"""Precision policy: the autocast context, loss scaling for fp16, and the unscale → clip → step order."""

from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], clip: float | None,
             want_norm: bool) -> torch.Tensor | None:
        """Unscale, clip the (already all-reduced) gradient, step; returns the pre-clip norm when asked or clipping."""
        self.scaler.unscale_(optimizer)
        norm = None
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        elif want_norm:
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm
