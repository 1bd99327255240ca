"""DistributedDataParallel with gradient sync skipped on all but the last micro-step, and torch's AMP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.batch import BatchPlan
from largebatch.config import Config
from largebatch.dist import DistInfo
from largebatch.engine.base import Engine, trainable, written_by_another_engine
from largebatch.engine.features import Cell
from largebatch.optim.state import load_named_state_dict, named_state_dict
from largebatch.precision import Precision, StepOutcome, grad_norm


class DDPEngine(Engine):
    """`model` is what the trainer calls; `module` is the bare model for eval, hashing and saving."""

    needs_process_group = False
    measures_in_reduction = True
    redoes_micro_steps = True
    capabilities = {"syncbatch": Cell(gpu_test="tests_gpu/test_cuda.py::test_syncbatchnorm")}

    def __init__(
        self,
        module: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        cfg: Config,
        plan: BatchPlan,
        info: DistInfo,
    ) -> None:
        self.module = module.to(info.device)
        self.model: nn.Module = self.module
        if info.world_size > 1:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            # gradients as views of DDP's buckets: the reduced bucket is the gradient, not copied back into it
            self.model = DistributedDataParallel(
                self.module, device_ids=device_ids, gradient_as_bucket_view=True
            )
        # the DDP module, as torch advises: dynamo then splits the graph at DDP's buckets, keeping the overlap
        self.compile_in_place(self.model, cfg.train.compile)
        self.optimizer = make_optimizer(self.module)
        self.precision = Precision(cfg.train.precision, info.device, cfg.train.fp16_init_scale)
        self.params = trainable(self.module)
        self.grad_scale = 1.0
        """The counted loss's factor for the next `step` (`scale_gradients`)."""
        self.bucket_sq: list[torch.Tensor] = []
        """Each bucket's local squared gradient norm, taken by the comm hook in the last synced backward."""
        if isinstance(self.model, DistributedDataParallel) and cfg.train.noise_scale:
            self.model.register_comm_hook(self.bucket_sq, _mean_with_local_sq)

    def micro_step(self, sync: bool) -> contextlib.AbstractContextManager:
        """All-reduce gradients in this micro-step's backward only if `sync` (what `no_sync()` toggles); forget the
        bucket norms of the backward before."""
        if isinstance(self.model, DistributedDataParallel):
            self.model.require_backward_grad_sync = sync
        self.bucket_sq.clear()
        return contextlib.nullcontext()

    def reduce_gradients(self) -> None:
        """Average gradients over ranks by hand, for steps whose micro-steps all ran with sync off."""
        if not isinstance(self.model, DistributedDataParallel):
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def local_grad_sq(self) -> float:
        """After a synced backward, what the comm hook saw before the mean over ranks; else the local gradient."""
        sq = (
            torch.stack(self.bucket_sq).sum().item()
            if self.bucket_sq
            else grad_norm(self.params).item() ** 2
        )
        return sq / self.precision.loss_scale**2

    def scale_gradients(self, factor: float) -> None:
        """Multiply the gradients by `factor` in the next `step`, in the pass that clips them."""
        self.grad_scale = factor

    def step(self, loss: float, max_norm: float | None, norm_sq: float) -> StepOutcome:
        scale, self.grad_scale = self.grad_scale, 1.0
        norm = self.precision.unscale_and_clip(self.optimizer, self.params, max_norm, scale).item()
        outcome = self.precision.step(self.optimizer, loss, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return outcome

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Every rank holds the whole state; rank 0 writes it."""
        return {
            "model": self.module.state_dict(),
            "optimizer": named_state_dict(self.module, self.optimizer),
            "scaler": self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], directory: Path) -> None:
        """Restore a checkpoint; optimizer hyperparameters and precision stay as this run's config sets them."""
        if "model" not in state:
            raise written_by_another_engine(directory, "model state in state.pt")
        self.module.load_state_dict(state["model"])
        load_named_state_dict(self.module, self.optimizer, state["optimizer"])
        self.precision.load_state_dict(state["scaler"])


def _mean_with_local_sq(bucket_sq, bucket):
    """DDP's own reduction of a gradient bucket (× 1/world, then an all-reduce sum: bit for bit what its reducer does
    without a hook; dividing instead rounds differently on 3 processes), after noting the bucket's local squared
    norm: the noise scale's small batch, measured without changing how the gradients are reduced (AdaptDL, and
    k-diffusion's DDPGradientStatsHook, measure it the same way). `bucket_sq`: a list of tensors; `bucket`: a
    dist.GradBucket; returns a Future of the reduced bucket. Unannotated: DDP checks a hook's annotations against
    torch's classes, and `from __future__ import annotations` makes them strings."""
    grads = bucket.buffer()
    bucket_sq.append(torch.linalg.vector_norm(grads, dtype=torch.float32).square())
    grads.mul_(1.0 / dist.get_world_size())
    return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])
