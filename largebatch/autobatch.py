"""`batch.micro_size: auto`: the largest micro-batch that fits, agreed by all ranks, halved on out-of-memory.

The search runs before the first step, every rank probing the same sizes in the same order and agreeing after
each probe, so it also suits an engine whose forward is collective (FSDP2). A mid-run out-of-memory error is redone
at half the micro-batch only on an engine whose micro-steps can be thrown away (`redoes_micro_steps`); elsewhere
the rank that hit it ends the job in one line (`stop_alone`), since its peers may be waiting inside a collective.

The global batch never changes: a smaller micro-batch means more accumulation steps over the same
examples. On CUDA "fits" means under the device memory (or `batch.memory_limit`); on CPU it means
under `batch.memory_limit`, counted as in `largebatch.memory`, and no limit means the whole per-rank share.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn

from largebatch.batch import BatchPlan
from largebatch.dist import several_ranks
from largebatch.memory import ActivationMeter, peak_bytes, state_bytes


def with_micro(plan: BatchPlan, micro: int) -> BatchPlan:
    return BatchPlan(plan.global_batch, micro, plan.per_rank // micro, plan.world_size)


def smaller(plan: BatchPlan) -> BatchPlan | None:
    """The plan with the largest micro-batch ≤ half the current one that still divides the per-rank share."""
    for micro in range(plan.micro_batch // 2, 0, -1):
        if plan.per_rank % micro == 0:
            return with_micro(plan, micro)
    return None


def agree_min(value: int, device: torch.device) -> int:
    """The smallest `value` over all ranks (every rank must call it)."""
    tensor = torch.tensor([value], device=device)
    if several_ranks():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def release(device: torch.device) -> None:
    """After a caught out-of-memory error (outside its except clause): collect what its traceback kept alive and
    return cached blocks (as Lightning's batch-size finder does), so that a retry starts from what the state needs."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def budget_bytes(limit: int | None, device: torch.device) -> int | None:
    """The memory a rank may use: the configured limit, else the whole GPU on CUDA, else unlimited."""
    if limit is not None:
        return limit
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def training_meter(
    budget: int | None, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> ActivationMeter | None:
    """What enforces the budget while training: on CUDA the allocator itself (capped at the budget),
    on CPU a meter that raises OverBudget when the saved activations pass what the state leaves free."""
    if budget is None:
        return None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        return None
    return ActivationMeter(max(0, budget - state_bytes(model, optimizer)))


def fits(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_micro_step: Callable[[int], None],
    micro: int,
    budget: int | None,
    device: torch.device,
) -> bool:
    """Forward + backward one micro-batch of `micro` and compare its peak memory with `budget`; leaves no trace."""
    if budget is None:
        return True
    saved = {
        k: v.clone() for k, v in model.state_dict().items()
    }  # BatchNorm statistics move in a train forward
    meter = training_meter(budget, model, optimizer, device) or ActivationMeter()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with meter.track(model):
            run_micro_step(micro)
        fit = peak_bytes(device, meter, model, optimizer) <= budget
    except torch.OutOfMemoryError:
        fit = False
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
    if not fit:
        release(
            device
        )  # outside the except clause: there the error's traceback still holds the activations
    return fit


def fit(
    plan: BatchPlan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run_micro_step: Callable[[int], None],
    budget: int | None,
    device: torch.device,
    largest: int | None = None,
) -> BatchPlan:
    """The largest micro-batch dividing the per-rank share (and at most `largest`) that fits on every rank: every
    rank probes the same candidates, largest first, and all agree after each probe (a collective forward stays in
    lockstep)."""
    candidates = [
        m
        for m in range(min(plan.per_rank, largest or plan.per_rank), 1, -1)
        if plan.per_rank % m == 0
    ]
    chosen = next(
        (
            m
            for m in candidates
            if agree_min(int(fits(model, optimizer, run_micro_step, m, budget, device)), device)
        ),
        1,
    )
    return with_micro(plan, chosen)


STOPPED_KEY = "largebatch/stopped_alone"


def stop_alone(reason: str) -> NoReturn:
    """End this process now with `reason` as the job's one line, without waiting for peers that may sit inside a
    collective: the first rank to stop prints it and marks the store, so that a peer whose collective then fails
    on the lost connection exits quietly (`peer_stopped`)."""
    first = True
    if dist.is_initialized():
        try:
            first = dist.distributed_c10d._get_default_store().add(STOPPED_KEY, 1) == 1
        except RuntimeError:  # the store is gone: a peer is already on its way out
            first = False
    if first:
        print(f"largebatch: stopped: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


def peer_stopped() -> bool:
    """Whether a peer ended the job with `stop_alone` (then a failed collective here is its consequence)."""
    if not dist.is_initialized():
        return False
    try:
        return dist.distributed_c10d._get_default_store().check([STOPPED_KEY])
    except RuntimeError:
        return False


INJECT_STEP = "LARGEBATCH_INJECT_OOM_AT_STEP"
INJECT_RANK = "LARGEBATCH_INJECT_OOM_RANK"


class InjectedOutOfMemory:
    """Test seam: with LARGEBATCH_INJECT_OOM_AT_STEP=n (and LARGEBATCH_INJECT_OOM_RANK=r: on that rank only, else
    on every rank) raise torch.OutOfMemoryError once, inside the backward of the last micro-step of step n, where a
    real one strikes: from a gradient hook on the output of the model's first sharded block (FSDP2; after FSDP's
    own pre-backward hook there, so its peers go on into that backward's collectives), else of its first module
    with parameters of its own. Without the variable it registers nothing."""

    def __init__(self, module: nn.Module, rank: int) -> None:
        self.step = int(os.environ.get(INJECT_STEP, 0))
        if os.environ.get(INJECT_RANK, str(rank)) != str(rank):
            self.step = 0
        self.armed = False
        if self.step:
            _first_block(module).register_forward_hook(self._hook_output)

    def arm(self, step: int, last_micro_step: bool) -> None:
        """Before each micro-step's forward: whether its backward is the one to fail."""
        self.armed = bool(self.step) and step == self.step and last_micro_step

    def _hook_output(self, module: nn.Module, args: Any, output: Any) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        grads = [t for t in outputs if isinstance(t, torch.Tensor) and t.requires_grad]
        if self.armed and grads:
            self.armed, self.step = False, 0
            name = type(module).__name__
            grads[0].register_hook(lambda grad: _raise_injected(name))


def _raise_injected(block: str) -> NoReturn:
    raise torch.OutOfMemoryError(f"injected by {INJECT_STEP} in the backward of {block}")


def _first_block(module: nn.Module) -> nn.Module:
    """The first FSDP2 unit inside `module` (not the root), else its first module with parameters of its own."""
    from torch.distributed.fsdp import FSDPModule

    inner = [m for m in module.modules() if m is not module]
    sharded = [m for m in inner if isinstance(m, FSDPModule)]
    owning = [m for m in inner if next(m.parameters(recurse=False), None) is not None]
    return (sharded or owning or [module])[0]
