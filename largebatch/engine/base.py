"""The engine interface and what every engine shares: the trainer talks to one `Engine`, never to a parallelism.

An engine owns the wrapped model, the optimizer and the precision policy (autocast, loss scaling), in the manner of
Lightning Fabric's Strategy: the trainer asks it for a sync context per micro-step, a backward, a gradient reduction
after unsynced micro-steps, and a step that clips and reports the global pre-clip norm; checkpoints go through its
collective `state_dict` / `save_shards` / `load_state_dict`. The clip and the optimizer step are one call because
DeepSpeed computes the norm inside its step (its clipping and overflow check share it).

What an engine can do is declared, not stubbed: flags the trainer asks (`measures_in_reduction`,
`redoes_micro_steps`), a member that is None where the engine lacks it (`reduce_gradients`, Fabric's
`_backward_sync_control = None`), and `capabilities`, the feature table that `check` refuses from and
docs/engines-matrix.md is generated from (`largebatch.engine.features`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from largebatch.batch import BatchPlan
from largebatch.config import Config
from largebatch.dist import DistInfo, broadcast_buffers
from largebatch.engine.features import Cell, refuse
from largebatch.errors import UserError
from largebatch.memory import State
from largebatch.optim.sharding import local
from largebatch.precision import Precision, StepOutcome


class Engine(ABC):
    """One parallelism behind the interface the trainer uses; a new engine subclasses this and registers in
    `largebatch.engine.engines`."""

    needs_process_group: ClassVar[bool]
    """Join a process group also when there is one process."""
    measures_in_reduction: ClassVar[bool]
    """With train.noise_scale, `local_grad_sq()` after a synced step gives what the step's reduction saw (measured
    inside it, so a measuring step reduces its gradients exactly as any other). False: the trainer runs a measuring
    step's micro-steps unsynced, asks `local_grad_sq()`, then calls `reduce_gradients()`."""
    redoes_micro_steps: ClassVar[bool]
    """A step's micro-steps can be thrown away and redone (they run unsynced, no collective inside), so
    batch.micro_size=auto halves the micro-batch on a mid-run out-of-memory error. False (FSDP2: every micro-step
    all-gathers parameters): the micro-batch is found before the first step only, and such an error stops the job."""
    capabilities: ClassVar[dict[str, Cell | tuple[Cell, ...]]] = {}
    """{feature id (`features.FEATURES`): how this engine supports it}, one cell, or one per `columns`
    entry; a feature not named runs on CPU and CUDA."""
    columns: ClassVar[dict[str, str]] = {}
    """Where support varies with a setting: {the matrix's column heading: the override that selects it}, in the
    order of the `capabilities` tuples and of `column`; {} is one column, headed by the engine's name."""

    compiled: dict[str, int] = {}  # noqa: RUF012 - replaced, never changed in place
    """train.compile: {class name: how many} of the modules compiled, for config.yaml's derived values."""
    module: nn.Module
    """The bare model, for eval (`full_state_dict` for its weights: ZeRO-3 partitions them)."""
    model: nn.Module
    """What forward is called on during training (the wrapped model)."""
    optimizer: torch.optim.Optimizer
    """The torch optimizer: its param groups carry the LR the trainer's schedule sets."""
    params: list[nn.Parameter]
    """The trainable parameters as the engine holds them (`trainable`), whose gradients it scales, clips and
    measures."""
    precision: Precision
    """Autocast and the loss scaler, where torch's own do it (DDP, FSDP2); DeepSpeed overrides what uses it."""
    reduce_gradients: Callable[[], None] | None
    """Average the gradients over ranks, after a step whose micro-steps all ran unsynced; None where the engine
    reduces only inside backward (FSDP: its `local_grad_sq` reads the local gradient on the way into the reduction)."""

    @abstractmethod
    def __init__(
        self,
        module: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        cfg: Config,
        plan: BatchPlan,
        info: DistInfo,
    ) -> None:
        """Wrap `module` on `info.device` and build its optimizer with `make_optimizer`."""

    @classmethod
    def column(cls, cfg: Config) -> int:
        """Which of `columns` `cfg` runs in (0 where there is one)."""
        return 0

    @classmethod
    def check(cls, cfg: Config, plan: BatchPlan, model: nn.Module | None) -> None:
        """Raise UserError on what this engine cannot run, before any process group starts (`model`: a freshly built
        one, or None when only the plan is wanted): a feature its `capabilities` refuse."""
        refuse(cls, cfg)
        if isinstance(cfg.train.compile, str):
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if cfg.train.compile not in known:
                raise UserError(
                    f"train.compile={cfg.train.compile} is not a torch.compile backend; use true (inductor), "
                    f"false, or one of {', '.join(known)}"
                )

    @staticmethod
    def per_rank(cfg: Config, world_size: int, whole: State) -> State:
        """The part of one model's training state (`whole`, as one process holds it) each of `world_size` ranks
        holds: everything, unless the engine shards it."""
        return whole

    @abstractmethod
    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward and backward; gradients are reduced over ranks only if `sync`."""

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.precision.backward(loss)

    def scale_gradients(self, factor: float) -> None:
        """Multiply this rank's gradients (its shards, where sharded) by `factor`: now, or (where the engine folds it
        into clipping's multiply) in the next `step`."""
        torch._foreach_mul_([local(p.grad) for p in self.params if p.grad is not None], factor)

    def set_plan(self, plan: BatchPlan) -> None:  # noqa: B027 - a default: most engines have no work here
        """Train the next steps under `plan`: a batch schedule changed accumulation, at a step boundary. The trainer
        sets each step's boundary, so only an engine that keeps its own count of it has work here."""

    @abstractmethod
    def local_grad_sq(self) -> float:
        """This rank's squared gradient norm before any reduction (unscaled): the noise scale's small batch. Called
        before the step's reduction, or after it where `measures_in_reduction`."""

    def norm_share(self) -> torch.Tensor | None:
        """Where the global gradient norm needs a collective (sharded gradients): this rank's Σg², which the trainer
        sums over ranks in the step's agreement and hands to `step` as `norm_sq`. None: `step` takes the norm
        itself."""
        return None

    @abstractmethod
    def step(self, loss: float, max_norm: float | None, norm_sq: float) -> StepOutcome:
        """Unscale and clip the reduced gradients to `max_norm`, step the optimizer if the step is usable (loss
        scaler included), zero the gradients; the outcome carries the global norm before clipping. `norm_sq`:
        the summed `norm_share`s where the engine has them (else ignored)."""

    @property
    def loss_scale(self) -> float | None:
        """The fp16 loss scale, or None without one."""
        return self.precision.loss_scale if self.precision.scaler.is_enabled() else None

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), before eval and saving, so eval,
        checkpoints and model.pt see the same statistics (DDP broadcasts them before each forward; DeepSpeed and
        FSDP2, which does not shard buffers, do not)."""
        broadcast_buffers(self.module)

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on every rank (collective): model.pt and the run's hash."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What rank 0 writes in the checkpoint's state.pt (collective: every rank calls it)."""

    def save_shards(self, directory: Path) -> None:  # noqa: B027 - a default: nothing, where state_dict has all
        """Write what each rank holds alone into the checkpoint being written at `directory` (collective); nothing
        where rank 0's `state_dict` holds the whole state."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any], directory: Path) -> None:
        """Restore from state.pt's contents and the checkpoint directory they came from (collective); the
        optimizer's hyperparameters stay as this run's config sets them."""

    @contextlib.contextmanager
    def keeping_hyperparameters(self) -> Iterator[None]:
        """Around a load of optimizer state that carries its param groups' settings: put back this run's (LR
        included), which the config and the trainer's schedule own."""
        settings = [
            {k: v for k, v in group.items() if k != "params"}
            for group in self.optimizer.param_groups
        ]
        yield
        for group, setting in zip(self.optimizer.param_groups, settings):
            group.update(setting)

    def files(self) -> dict[str, Any]:
        """{file name: JSON-able content} written to the run directory at start (e.g. the effective engine config)."""
        return {}

    def derived(self) -> dict[str, Any]:
        """What this engine decided from the config and the model, written under `derived` in config.yaml beside
        the job's values (e.g. FSDP's shard units), so the config keeps what the user wrote."""
        return {"compiled": self.compiled} if self.compiled else {}

    def compile_in_place(self, module: nn.Module, backend: bool | str) -> None:
        """`train.compile`: torch.compile `module`'s forward in place (`nn.Module.compile`), so the object, its hooks
        and its state-dict keys stay (`torch.compile(module)` would wrap it and prefix every key with `_orig_mod.`);
        counted in `compiled`."""
        if backend:
            module.compile(backend="inductor" if backend is True else backend)
            name = type(module).__name__
            self.compiled = {**self.compiled, name: self.compiled.get(name, 0) + 1}


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """`module`'s trainable parameters, taken when the engine has wrapped it: FSDP2's are then the sharded DTensors
    that receive the gradients (between unsynced micro-steps it registers unsharded ones in their place)."""
    return [p for p in module.parameters() if p.requires_grad]


def written_by_another_engine(directory: Path, missing: str) -> UserError:
    """The error for a checkpoint that lacks this engine's state (`missing`: what it lacks)."""
    return UserError(
        f"checkpoint {directory} has no {missing}: another engine wrote it; resume it with that "
        f"engine.name, or run.resume=never"
    )
