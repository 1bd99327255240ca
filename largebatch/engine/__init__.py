"""The engine interface: what differs by parallelism, behind one object the trainer does not branch on.

An engine owns the wrapped model, the optimizer and the precision policy (autocast, loss scaling), in the
manner of Lightning Fabric's Strategy: the trainer asks it for a sync context per micro-step, a backward, a
gradient reduction after unsynced micro-steps, the global pre-clip norm, and a step; checkpoints go through its
collective `state_dict` / `load_state_dict`. `engines()` maps an engine's name to its builder; DDP is the first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from largebatch.precision import StepOutcome


class Engine(Protocol):
    module: nn.Module
    """The bare model: eval, hashing, model.pt."""
    model: nn.Module
    """What forward is called on during training (the wrapped model)."""
    optimizer: torch.optim.Optimizer

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are reduced over ranks only if `sync`."""

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def reduce_gradients(self) -> None:
        """Average the gradients over ranks, after a step whose micro-steps all ran unsynced."""

    def scale_gradients(self, factor: float) -> None: ...

    def local_grad_sq(self) -> float:
        """This rank's squared gradient norm before any reduction (unscaled): the noise scale's small batch."""

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """Unscale and clip the reduced gradients; returns the global norm before clipping."""

    def step(self, loss: float, norm: float) -> StepOutcome:
        """Step the optimizer if the step is usable (loss scaler included), then zero the gradients."""

    @property
    def loss_scale(self) -> float | None:
        """The fp16 loss scale, or None without one."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers, before eval and saving."""

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and precision state (collective: every rank calls it)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


EngineBuilder = Callable[..., Engine]


def engines() -> dict[str, EngineBuilder]:
    from largebatch.engine.ddp import DDPEngine

    return {"ddp": DDPEngine}
