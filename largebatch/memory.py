"""Measuring training memory the same way on CPU and CUDA, and a budget that acts like an out-of-memory error.

On CUDA the figure is the allocator's peak (`torch.cuda.max_memory_allocated`). On CPU, where torch
keeps no allocator statistics, it is counted: parameters + gradients + optimizer state + the bytes of
the tensors autograd saves for backward during the forward pass (unique storages, via
`saved_tensors_hooks`). With gradient checkpointing, backward briefly recomputes one block's
activations on top of that; the count leaves that out.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from largebatch.errors import UserError

UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, key: str) -> int:
    """'512MiB', '2GiB', '1.5GB' → bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise UserError(f"{key}={text!r} must be a size with a unit, e.g. 512MiB or 2GiB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class State:
    """Bytes of training state: parameters and buffers, their gradients, the optimizer's state."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, gradients: bool = True
) -> State:
    """Parameters and buffers, their gradients unless `gradients=False`, and the optimizer's state (estimated before
    its first step: 2 slots with betas, 1 with momentum)."""
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if optimizer is None:
        optimizer_bytes = 0
    elif optimizer.state:
        optimizer_bytes = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
    else:
        group = optimizer.param_groups[0]
        optimizer_bytes = (
            2 if "betas" in group else int(group.get("momentum", 0) > 0)
        ) * param_bytes
    return State(param_bytes + buffers, param_bytes if gradients else 0, optimizer_bytes)


def state_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None, gradients: bool = True
) -> int:
    """`training_state(...).total`."""
    return training_state(model, optimizer, gradients).total


class OverBudget(torch.OutOfMemoryError):
    """The memory budget (batch.memory_limit) would be exceeded: handled exactly like a real CUDA OOM."""


class ActivationMeter:
    """Counts the bytes autograd saves for backward, parameters excluded (they are state);
    optionally raises OverBudget once `limit` is passed."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.bytes = 0
        self._seen: set[int] = set()

    @contextlib.contextmanager
    def track(self, model: nn.Module) -> Iterator[ActivationMeter]:
        self.bytes = 0
        self._seen = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # A Parameter not seen at the start is FSDP's all-gathered copy of a shard: state, not an activation.
        if storage.data_ptr() not in self._seen and not isinstance(tensor, nn.Parameter):
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
            if self.limit is not None and self.bytes > self.limit:
                raise OverBudget(f"activations passed the budget of {self.limit} bytes")
        # Detached: the saved object must not reference its own graph (tensor → grad_fn → saved tensor), a cycle
        # through C++ that gc cannot see, which kept a failed step's activations alive after an out-of-memory error.
        return tensor.detach()


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's own tensor of a parameter (FSDP2's are DTensors, whose wrapper has no storage). DTensor's module is
    not imported here (1 s): without it loaded, no parameter is one."""
    tensors = sys.modules.get("torch.distributed.tensor")
    return param.to_local() if tensors and isinstance(param, tensors.DTensor) else param


def peak_bytes(
    device: torch.device,
    meter: ActivationMeter,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> int:
    """The step's peak: the allocator's on CUDA, counted state + saved activations on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return state_bytes(model, optimizer) + meter.bytes


def process_peak_mib(device: torch.device) -> float:
    """For the metrics: the allocator's peak on CUDA, else this process's peak resident set size (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
