"""torch FSDP2 (`fully_shard`: every parameter a DTensor sharded on dim 0 over the ranks) behind the engine interface.

Each block of the model is sharded as one unit (all-gathered for its forward and backward, resharded after), then
the root with what is left, as torchtitan does. Blocks are the classes named in `engine.shard_blocks`, else a Hugging
Face model's `_no_split_modules`, else the model's repeated blocks (`blocks`). bf16 and fp16 are FSDP's
MixedPrecisionPolicy (half-precision compute copies of the parameters, fp32 gradient reduction) with autocast for the
loss; fp16 adds torch's sharded loss scaler (`ShardScaler`), whose overflow check all ranks agree on. Between
micro-steps of one step FSDP neither reduces nor reshards; the last micro-step reduce-scatters. The global gradient
norm is each rank's Σg² over its shards, summed in the step's one agreement (no all-reduce of its own), and clipping
multiplies the shards; checkpoints are
`torch.distributed.checkpoint` with sharded state dicts, so another world size reshards on load.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

from largebatch.batch import BatchPlan
from largebatch.config import Config
from largebatch.dist import DistInfo
from largebatch.engine.base import Engine, trainable, written_by_another_engine
from largebatch.engine.features import refused
from largebatch.errors import UserError
from largebatch.memory import State
from largebatch.optim.sharding import local
from largebatch.precision import Precision, StepOutcome, clip_factor

SHARDS = "fsdp"
"""The checkpoint's subdirectory for the torch.distributed.checkpoint files."""
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""train.precision → the dtype FSDP all-gathers the parameters in and computes with (fp32: none)."""


class ShardScaler(ShardedGradScaler):
    """torch's loss scaler for sharded gradients (an overflow in one rank's shard skips the step on every rank), with
    GradScaler's found-inf flag: a scalar 0 or 1. ShardedGradScaler's is the sum over ranks, of shape (1,), and
    torch's fused Adam and AdamW skip only on a flag of exactly 1 and subtract it from their scalar step counts
    (torch 2.14: an overflow on both ranks stepped with infinite gradients)."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self.is_enabled():
            return
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {
            device: found.reshape(()).clamp(max=1.0)
            for device, found in state["found_inf_per_device"].items()
        }


class MeasuredReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter that first adds Σg² of its input to `sq`: the input is this rank's whole local
    gradient of one unit, accumulated over the step's micro-steps and not yet reduced (flat, zero-padded; fp32, as
    the policy's reduce dtype, so not pre-divided) — the noise scale's small batch, which FSDP has no hook for."""

    def __init__(self) -> None:
        self.sq = 0.0

    def allocate(
        self, size: Sequence[int | torch.SymInt], *, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: dist.ReduceOp,
        async_op: bool = False,
    ) -> dist.Work | None:
        self.sq = self.sq + torch.linalg.vector_norm(input_tensor).double().square()
        return dist.reduce_scatter_tensor(
            output_tensor, input_tensor, op=op, group=group, async_op=async_op
        )


def blocks(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules to shard as units, outermost first: instances of the classes in `names`, else of a Hugging Face
    model's `_no_split_modules`, else of the classes the model holds more than once that have children and are not
    containers (transformer and residual blocks), outermost only. [] means: the whole model is one unit."""
    chosen = set(names or getattr(model, "_no_split_modules", None) or [])
    if names:
        present = {type(m).__name__ for m in model.modules()}
        if missing := sorted(set(names) - present):
            candidates = sorted(
                {type(m).__name__ for m in model.modules() if list(m.children())}
                - {type(model).__name__}
            )
            raise UserError(
                f"engine.shard_blocks names {', '.join(missing)}, which the model does not have; "
                f"its module classes with children: {', '.join(candidates) or 'none'}"
            )
    if not chosen:
        counts = Counter(
            type(m).__name__
            for m in model.modules()
            if m is not model and list(m.children()) and not isinstance(m, CONTAINERS)
        )
        chosen = {name for name, n in counts.items() if n > 1}
    found: list[nn.Module] = []
    for module in model.modules():
        if (
            module is not model
            and type(module).__name__ in chosen
            and not any(sub is module for outer in found for sub in outer.modules())
        ):
            found.append(module)
    return found


class FSDPEngine(Engine):
    """`model` and `module` are the same object: fully_shard turns the model itself into the sharded one."""

    needs_process_group = True
    """fully_shard needs a device mesh, also for one process."""
    measures_in_reduction = True
    """Each rank's reduce-scatters see its whole local gradient of the step (MeasuredReduceScatter)."""
    redoes_micro_steps = False
    """Unsynced micro-steps still all-gather each block's parameters: an out-of-memory error on one rank leaves the
    others inside a collective, so micro_size=auto is found before the first step and a mid-run one stops the job."""

    capabilities = {
        "cbs": refused(
            "branches copy the engine's whole training state in memory, which engine.name=fsdp shards (not "
            "built); use engine.name=ddp, or largebatch cbs on a ddp run's checkpoint"
        ),
        "syncbatch": refused(
            "is not supported with engine.name=fsdp; use model.norm=group or layer, or engine.name=ddp"
        ),
    }

    @classmethod
    def check(cls, cfg: Config, plan: BatchPlan, model: nn.Module | None) -> None:
        """Also: `engine.shard_blocks` names classes the model has."""
        super().check(cfg, plan, model)
        if model is not None:
            blocks(model, cfg.engine.shard_blocks)

    @staticmethod
    def per_rank(cfg: Config, world_size: int, whole: State) -> State:
        """A 1/world shard of everything (buffers are counted whole: they are few); not counted: one unit all-gathered
        during its forward and backward."""
        return State(
            *(-(-part // world_size) for part in (whole.params, whole.grads, whole.optimizer))
        )

    def __init__(
        self,
        module: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        cfg: Config,
        plan: BatchPlan,
        info: DistInfo,
    ) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        half = HALF.get(cfg.train.precision)
        policy = (
            MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
            if half
            else MixedPrecisionPolicy()
        )
        module = module.to(info.device)
        self.units = blocks(module, cfg.engine.shard_blocks)
        # by class, before fully_shard renames the classes (Block → FSDPBlock)
        self.unit_classes = dict(Counter(type(u).__name__ for u in self.units))
        for unit in self.units:
            self.compile_in_place(unit, cfg.train.compile)  # per block, as torchtitan does
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        if not self.units:
            self.compile_in_place(module, cfg.train.compile)
        self.module = self.model = fully_shard(module, mesh=mesh, mp_policy=policy)
        self.params = trainable(self.module)
        self.optimizer = make_optimizer(self.module)
        self.precision = Precision(
            cfg.train.precision, info.device, cfg.train.fp16_init_scale, ShardScaler
        )
        self.device = info.device
        self.grad_scale = 1.0
        """The counted loss's factor for the next `step` (`scale_gradients`)."""
        self.measured: MeasuredReduceScatter | None = None
        """train.noise_scale on 2+ ranks: every unit's reduce-scatter, measuring what it reduces (the setter is
        per module). On one rank nothing is reduced: every micro-step syncs (a copy into the whole-tensor shard),
        so the first micro-batch's gradient is readable, as on DDP."""
        self.sync_always = cfg.train.noise_scale and info.world_size == 1
        if cfg.train.noise_scale and info.world_size > 1:
            self.measured = MeasuredReduceScatter()
            for unit in [*self.units, self.module]:
                unit.set_custom_reduce_scatter(self.measured)

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """Reduce-scatter the gradients and reshard after backward only on the step's last micro-step (the
        reduction that `local_grad_sq` measures)."""
        self.model.set_requires_gradient_sync(sync or self.sync_always)
        self.model.set_reshard_after_backward(sync)
        if sync and self.measured is not None:
            self.measured.sq = 0.0
        return contextlib.nullcontext()

    reduce_gradients = None
    """FSDP reduces in backward, so a step syncs on its last micro-step, also when the noise scale is measured."""

    def local_grad_sq(self) -> float:
        """On 2+ ranks, Σg² of what this rank's reduce-scatters of the step received; on one, of the gradient so
        far (unscaled)."""
        if self.measured is not None:
            sq = float(self.measured.sq)
        else:
            sq = float(self._shard_sq())
        return sq / self.precision.loss_scale**2

    def _shard_sq(self) -> torch.Tensor:
        """Σg² over this rank's gradient shards, as a float64 tensor (no host sync)."""
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return torch.stack(torch._foreach_norm(grads)).double().square().sum()

    def scale_gradients(self, factor: float) -> None:
        """Multiply the gradient shards by `factor` in the next `step`, in the pass that clips them."""
        self.grad_scale = factor

    def norm_share(self) -> torch.Tensor:
        """Unscale this rank's gradient shards (fp16: an overflow in any rank's shard skips the step on all) and
        return their Σg², which the step's agreement sums into the global norm: no all-reduce of its own."""
        self.precision.unscale(self.optimizer)
        return self._shard_sq()

    def step(self, loss: float, max_norm: float | None, norm_sq: float) -> StepOutcome:
        """The global norm from the agreed Σg², times the counted loss's factor; that factor and clipping's in one
        multiply of the shards; then the optimizer if the step is usable."""
        scale, self.grad_scale = self.grad_scale, 1.0
        norm = math.sqrt(norm_sq) * scale
        factor = clip_factor(norm, max_norm, scale)
        if factor != 1.0:
            torch._foreach_mul_([local(p.grad) for p in self.params if p.grad is not None], factor)
        outcome = self.precision.step(self.optimizer, loss, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return outcome

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model on every rank, gathered from the shards (collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state (the same on every rank) for state.pt: model and optimizer go through
        `save_shards`."""
        return {"scaler": self.precision.state_dict()}

    def _sharded(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optimizer": optimizer}

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its shards of the model and of the optimizer state, by parameter name (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded(), checkpoint_id=directory / SHARDS)

    def load_state_dict(self, state: dict[str, Any], directory: Path) -> None:
        """Load the shards this rank holds now, from a checkpoint written by any number of processes (collective);
        optimizer hyperparameters stay this run's config's."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (directory / SHARDS / ".metadata").is_file():
            raise written_by_another_engine(directory, f"FSDP shards under {SHARDS}/")
        with self.keeping_hyperparameters():
            sharded = self._sharded()
            dcp.load(sharded, checkpoint_id=directory / SHARDS)
            set_state_dict(
                self.module,
                self.optimizer,
                model_state_dict=sharded["model"],
                optim_state_dict=sharded["optimizer"],
            )
        self.precision.load_state_dict(state.get("scaler", {}))

    def files(self) -> dict[str, Any]:
        """Written to the run directory: which modules were sharded as units, by name and by class."""
        names = {id(m): n for n, m in self.module.named_modules()}
        return {
            "fsdp.json": {
                "units": [names[id(u)] for u in self.units] + ["(root)"],
                **self.derived(),
                "world_size": torch.distributed.get_world_size(),
            }
        }

    def derived(self) -> dict[str, Any]:
        """`shard_blocks`: the classes sharded as units and how many of each ({} when the whole model is one unit);
        the root, with what is left, is one more unit."""
        return {**super().derived(), "shard_blocks": self.unit_classes}
