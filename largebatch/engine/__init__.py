"""The engine interface: what differs by parallelism, behind one object the trainer does not branch on.

An engine owns the wrapped model, the optimizer and the precision policy (autocast, loss scaling), in the
manner of Lightning Fabric's Strategy: the trainer asks it for a sync context per micro-step, a backward, a
gradient reduction after unsynced micro-steps, and a step that clips and reports the global pre-clip norm;
checkpoints go through its collective `state_dict` / `save_shards` / `load_state_dict`. `engines()` maps
`engine.name` to its class: DDP, DeepSpeed ZeRO and torch FSDP2. The clip and the optimizer step are one call because
DeepSpeed computes the norm inside its step (its clipping and overflow check share it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from largebatch.batch import BatchPlan
from largebatch.config import Config
from largebatch.dist import DistInfo
from largebatch.memory import State
from largebatch.precision import StepOutcome
from largebatch.registry import ENGINES


class Engine(Protocol):
    needs_process_group: bool
    """Join a process group also when there is one process."""
    measures_in_reduction: bool
    """With train.noise_scale, `local_grad_sq()` after a synced step gives what the step's reduction saw (measured
    inside it, so a measuring step reduces its gradients exactly as any other). False: the trainer runs a measuring
    step's micro-steps unsynced, asks `local_grad_sq()`, then calls `reduce_gradients()`."""
    redoes_micro_steps: bool
    """A step's micro-steps can be thrown away and redone (they run unsynced, no collective inside), so
    batch.micro_size=auto halves the micro-batch on a mid-run out-of-memory error. False (FSDP2: every micro-step
    all-gathers parameters): the micro-batch is found before the first step only, and such an error stops the job."""
    module: nn.Module
    """The bare model, for eval (`full_state_dict` for its weights: ZeRO-3 partitions them)."""
    model: nn.Module
    """What forward is called on during training (the wrapped model)."""
    optimizer: torch.optim.Optimizer
    """The torch optimizer: its param groups carry the LR the trainer's schedule sets."""

    @staticmethod
    def check(cfg: Config, plan: BatchPlan, model: nn.Module | None) -> None:
        """Raise UserError on what this engine cannot run, before any process group starts (`model`: a freshly built
        one, or None when only the plan is wanted)."""

    @staticmethod
    def per_rank(cfg: Config, world_size: int, whole: State) -> State:
        """The part of one model's training state (`whole`, as one process holds it) each of `world_size` ranks
        holds."""

    def __init__(
        self,
        module: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        cfg: Config,
        plan: BatchPlan,
        info: DistInfo,
    ) -> None: ...

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are reduced over ranks only if `sync`."""

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    reduce_gradients: Callable[[], None] | None
    """Average the gradients over ranks, after a step whose micro-steps all ran unsynced; None where the engine
    reduces only inside backward (FSDP: its `local_grad_sq` reads the local gradient on the way into the reduction)."""

    def scale_gradients(self, factor: float) -> None: ...

    def set_plan(self, plan: BatchPlan) -> None:
        """Train the next steps under `plan`: a batch schedule changed accumulation, at a step boundary (the
        trainer sets each step's boundary, so only an engine that keeps its own count of it has work here)."""

    def local_grad_sq(self) -> float:
        """This rank's squared gradient norm before any reduction (unscaled): the noise scale's small batch. Called
        before the step's reduction, or after it where `measures_in_reduction`."""

    def step(self, loss: float, max_norm: float | None) -> StepOutcome:
        """Unscale and clip the reduced gradients to `max_norm`, step the optimizer if the step is usable (loss
        scaler included), zero the gradients; the outcome carries the global norm before clipping."""

    @property
    def loss_scale(self) -> float | None:
        """The fp16 loss scale, or None without one."""

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers, before eval and saving."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on every rank (collective): model.pt and the run's hash."""

    def state_dict(self) -> dict[str, Any]:
        """What rank 0 writes in the checkpoint's state.pt (collective: every rank calls it)."""

    def save_shards(self, directory: Path) -> None:
        """Write what each rank holds alone into the checkpoint being written at `directory` (collective)."""

    def load_state_dict(self, state: dict[str, Any], directory: Path) -> None:
        """Restore from state.pt's contents and the checkpoint directory they came from (collective)."""

    def files(self) -> dict[str, Any]:
        """{file name: JSON-able content} written to the run directory at start (e.g. the effective engine config)."""

    def derived(self) -> dict[str, Any]:
        """What this engine decided from the config and the model, written under `derived` in config.yaml beside
        the job's values (e.g. FSDP's shard units), so the config keeps what the user wrote."""


def engines() -> dict[str, type[Engine]]:
    """{engine.name: its class}, from the registry (each imported here, on first use)."""
    return {name: entry.load() for name, entry in ENGINES.items()}
