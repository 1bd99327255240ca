"""The training loop: one optimizer step per global batch, accumulated over micro-steps."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch import autobatch, checkpoint, config, models, optim
from largebatch.batch import BatchPlan, GlobalBatchSampler
from largebatch.data import ArrayDataset, keep_batch, task_loss
from largebatch.dist import DistInfo, all_reduce_sum
from largebatch.engine.ddp import DDPEngine
from largebatch.errors import TrainingStopped, warn
from largebatch.job import Job
from largebatch.memory import process_peak_mib
from largebatch.noise import NoiseScale
from largebatch.optim.schedules import Schedule
from largebatch.precision import Precision, grad_norm
from largebatch.track import Tracker


@dataclass
class TrainState:
    """Everything a checkpoint must hold to resume bit-exactly; the data position is `step` itself."""

    engine: DDPEngine
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    step: int = 0
    nonfinite_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.engine.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
            "rng": torch.get_rng_state(), "step": self.step, "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        self.step, self.nonfinite_steps = state["step"], state["nonfinite_steps"]


def build_state(job: Job, info: DistInfo) -> TrainState:
    cfg = job.cfg
    torch.manual_seed(cfg.run.seed)
    engine = DDPEngine(models.build(cfg.model, job.task.input_shape, job.task.num_classes), info)
    optimizer = optim.build(engine.module, cfg.optim, job.peak_lr)
    schedule = Schedule(cfg.schedule, job.total_steps, job.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    state = TrainState(engine, optimizer, scheduler, Precision(cfg.train.precision, info.device, cfg.train.fp16_init_scale))
    if job.resume_from is not None:
        state.load_state_dict(checkpoint.load(job.resume_from))
    return state


class Batches:
    """This rank's micro-batches from a given step on, under a given plan (rebuilt when the plan changes)."""

    def __init__(self, job: Job, info: DistInfo) -> None:
        self.job, self.info = job, info
        self._it = iter(())

    def restart(self, plan: BatchPlan, step: int) -> None:
        sampler = GlobalBatchSampler(len(self.job.task.train), plan, self.info.rank, self.job.cfg.run.seed,
                                     self.job.total_steps, step)
        self._it = iter(torch.utils.data.DataLoader(
            self.job.task.train, batch_sampler=sampler, collate_fn=keep_batch,
            num_workers=self.job.cfg.data.workers, pin_memory=self.info.device.type == "cuda",
        ))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.info.device, non_blocking=True) for t in next(self._it))


def fit(job: Job, info: DistInfo) -> dict[str, Any]:
    """Train `job` on this rank (process group already joined); rank 0 writes the run directory. Returns the summary."""
    cfg, plan = job.cfg, job.plan
    torch.use_deterministic_algorithms(cfg.run.deterministic)
    if info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        config.dump(cfg, job.derived(), cfg.run_dir / "config.yaml")
    s = build_state(job, info)
    model, params = s.engine.model, [p for p in s.engine.module.parameters() if p.requires_grad]
    items_per_step = plan.per_rank * job.task.items_per_example
    loss_sum = torch.zeros((), device=info.device)
    inject_oom_at = int(os.environ.get("LARGEBATCH_INJECT_OOM_AT_STEP", 0))
    budget = autobatch.budget_bytes(job.memory_limit, info.device)
    meter = autobatch.training_meter(budget, s.engine.module, s.optimizer, info.device) if job.auto_micro else None

    noise = NoiseScale() if cfg.train.noise_scale else None
    first_micro_sq = 0.0

    def accumulate(plan: BatchPlan, manual_sync: bool) -> None:
        """Forward and backward over this rank's micro-batches of the step; gradients sync on the last one
        (or, with `manual_sync`, not at all: the caller all-reduces once every rank got through)."""
        nonlocal inject_oom_at, first_micro_sq, loss_sum
        for micro_step in range(plan.accum_steps):
            x, y = batches.next()
            s.engine.sync_gradients(not manual_sync and micro_step == plan.accum_steps - 1)
            if inject_oom_at == s.step + 1 and micro_step == plan.accum_steps - 1:
                inject_oom_at = 0
                raise torch.OutOfMemoryError("injected by LARGEBATCH_INJECT_OOM_AT_STEP")
            with meter.track(s.engine.module) if meter else contextlib.nullcontext(), s.precision.autocast():
                # Sum over the micro-batch / loss terms per rank per step; DDP's mean over ranks then
                # makes the gradient the mean over the global batch, whatever the split.
                loss = task_loss(model(x), y, reduction="sum") / items_per_step
            s.precision.backward(loss)
            loss_sum += loss.detach()
            if micro_step == 0 and measuring and info.world_size == 1:
                first_micro_sq = _grad_sq(params, s.precision) * plan.accum_steps**2

    def probe(micro: int) -> None:
        x, y = (t[:micro].clone().to(info.device) for t in (job.task.train.inputs, job.task.train.labels))
        with s.precision.autocast():
            task_loss(s.engine.module(x), y, reduction="sum").backward()

    if job.auto_micro:
        plan = autobatch.fit(plan, s.engine.module, s.optimizer, probe, budget, info.device)
    if info.is_main:
        print(f"{plan.describe()}; peak lr {job.peak_lr:.6g}; {job.total_steps} steps "
              f"({job.steps_per_epoch} per epoch), warmup {job.warmup_steps}", flush=True)
        if job.resume_from is not None:
            print(f"resuming from {job.resume_from} at step {s.step}", flush=True)
    batches = Batches(job, info)
    batches.restart(plan, s.step)
    tracker = Tracker(job, info.is_main, s.step)
    start = last_log = time.perf_counter()
    first_step = last_logged_step = s.step
    eval_s = 0.0

    while s.step < job.total_steps:
        model.train()
        measuring = noise is not None and (s.step + 1) % cfg.train.log_every == 0
        manual_sync = job.auto_micro or (measuring and info.world_size > 1)
        if job.auto_micro:
            plan = _accumulate_or_shrink(accumulate, plan, s, batches, info)
        else:
            accumulate(plan, manual_sync)
        if measuring:
            small = (_mean_over_ranks(_grad_sq(params, s.precision), info), plan.per_rank) if info.world_size > 1 \
                else (first_micro_sq, plan.micro_batch)
        if manual_sync:
            s.engine.all_reduce_gradients()
        grad_norm = s.precision.unscale_and_clip(s.optimizer, params, cfg.train.clip_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
        if not finite and cfg.train.nonfinite == "stop":
            raise TrainingStopped(f"non-finite gradient at step {s.step + 1} (train.nonfinite=stop); "
                                  f"lower optim.lr, set train.clip_grad_norm or use train.precision=fp32")
        s.precision.step(s.optimizer, skip=not finite)
        s.nonfinite_steps += not finite
        lr = s.scheduler.get_last_lr()[0]
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.step += 1

        last = s.step == job.total_steps
        eval_now = (cfg.train.eval_every and s.step % cfg.train.eval_every == 0) or last
        if s.step % cfg.train.log_every == 0 or eval_now or not finite:
            now = time.perf_counter()
            record = {
                "step": s.step, "samples": s.step * plan.global_batch, "epoch": s.step / job.steps_per_epoch,
                "loss": all_reduce_sum(loss_sum).item() / info.world_size, "lr": lr, "grad_norm": grad_norm.item(),
                "samples_per_s": (s.step - last_logged_step) * plan.global_batch / (now - last_log),
                "micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps,
                "memory_mib": process_peak_mib(info.device),
                "nonfinite_steps": s.nonfinite_steps, **optim.trust_ratios(s.engine.module, s.optimizer),
            }
            if measuring and finite and small[1] < plan.global_batch:
                record.update(noise.update(*small, record["grad_norm"] ** 2, plan.global_batch))
            if eval_now:
                record.update({f"eval/{k}": v for k, v in evaluate(s.engine.module, job.task.eval, info).items()})
                eval_s += time.perf_counter() - now
            tracker.log(record)
            last_log, last_logged_step = time.perf_counter(), s.step
        loss_sum.zero_()
        if cfg.train.checkpoint_every and (s.step % cfg.train.checkpoint_every == 0 or last) and info.is_main:
            checkpoint.save(cfg.run_dir, s.step, s.state_dict(), job.identity(), cfg.train.checkpoint_keep)

    if s.nonfinite_steps:
        warn(f"{s.nonfinite_steps} step(s) had a non-finite loss or gradient and were skipped")
    wall_s = time.perf_counter() - start
    summary = {
        "steps": job.total_steps,
        "samples": job.total_steps * plan.global_batch,
        "final_loss": tracker.last.get("loss"),
        "eval": {k.removeprefix("eval/"): v for k, v in tracker.last.items() if k.startswith("eval/")},
        "wall_s": wall_s,
        "samples_per_s": (job.total_steps - first_step) * plan.global_batch / max(wall_s - eval_s, 1e-9),
        "world_size": plan.world_size,
        "global_batch": plan.global_batch,
        "micro_batch": plan.micro_batch,
        "accum_steps": plan.accum_steps,
        "peak_lr": job.peak_lr,
        "nonfinite_steps": s.nonfinite_steps,
        "params_sha256": params_sha256(s.engine.module),
    }
    tracker.finish(summary)
    if info.is_main:
        torch.save(s.engine.module.state_dict(), cfg.run_dir / "model.pt")
    return summary


def _grad_sq(params: list[torch.Tensor], precision: Precision) -> float:
    """Squared norm of this rank's (unsynchronised, possibly loss-scaled) gradient, unscaled."""
    scale = precision.scaler.get_scale() if precision.scaler.is_enabled() else 1.0
    return (grad_norm(params).item() / scale) ** 2


def _mean_over_ranks(value: float, info: DistInfo) -> float:
    return all_reduce_sum(torch.tensor(value, dtype=torch.float64, device=info.device)).item() / info.world_size


def _accumulate_or_shrink(accumulate: Callable[[BatchPlan, bool], None], plan: BatchPlan, s: TrainState,
                          batches: Batches, info: DistInfo) -> BatchPlan:
    """Run the step's micro-steps unsynchronised; if any rank ran out of memory, all halve the micro-batch
    and redo the step. The caller all-reduces the gradients."""
    while True:
        try:
            accumulate(plan, True)
            ok = 1
        except torch.OutOfMemoryError:
            ok = 0
        if autobatch.agree_min(ok, info.device):
            return plan
        s.optimizer.zero_grad(set_to_none=True)
        smaller = autobatch.smaller(plan)
        if smaller is None:
            raise TrainingStopped(f"out of memory at step {s.step + 1} even with micro-batch 1; "
                                  f"raise batch.memory_limit or use model.grad_checkpointing")
        warn(f"out of memory at step {s.step + 1} with micro-batch {plan.micro_batch}; "
             f"redoing the step as {smaller.describe()}")
        plan = smaller
        batches.restart(plan, s.step)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ArrayDataset, info: DistInfo, batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy (per example, or per token) on the held-out set, sharded over ranks."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=info.device)
    mine = torch.arange(info.rank, len(dataset), info.world_size)
    for chunk in mine.split(batch_size):
        x, y = (t.to(info.device) for t in dataset.__getitems__(chunk.tolist()))
        logits, y = model(x).flatten(0, -2).float(), y.flatten()
        totals += torch.stack([
            F.cross_entropy(logits, y, reduction="sum").double(),
            (logits.argmax(1) == y).sum().double(),
            torch.tensor(len(y), dtype=torch.float64, device=info.device),
        ])
    loss, correct, count = all_reduce_sum(totals).tolist()
    return {"loss": loss / count, "accuracy": correct / count}


def params_sha256(model: nn.Module) -> str:
    """Hash of every tensor in the state dict, by name, so two runs can be checked for bit-identity."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
