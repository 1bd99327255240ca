"""DistributedDataParallel with gradient sync skipped on all but the last micro-step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.dist import DistInfo


class DDPEngine:
    """`model` is what the trainer calls; `module` is the bare model for eval, hashing and saving."""

    def __init__(self, module: nn.Module, info: DistInfo) -> None:
        self.module = module.to(info.device)
        self.model: nn.Module = self.module
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=device_ids)

    def sync_gradients(self, enabled: bool) -> None:
        """All-reduce gradients in the next backward only if `enabled` (what `no_sync()` toggles)."""
        if isinstance(self.model, DistributedDataParallel):
            self.model.require_backward_grad_sync = enabled

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before each forward;
        called before eval and saving, so eval, checkpoints and model.pt see the same statistics."""
        if isinstance(self.model, DistributedDataParallel):
            for buffer in self.module.buffers():
                dist.broadcast(buffer, 0)

    def all_reduce_gradients(self) -> None:
        """Average gradients over ranks by hand, for steps whose micro-steps all ran with sync off."""
        if not isinstance(self.model, DistributedDataParallel):
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)
