"""Everything derived from the config and the world size, computed and checked before any process group starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largebatch import batch, checkpoint, data, memory, models, optim
from largebatch.config import Config
from largebatch.errors import UserError
from largebatch.optim.scaling import peak_lr


@dataclass
class Job:
    cfg: Config
    task: data.Task
    plan: batch.BatchPlan
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    resume_from: Path | None
    memory_limit: int | None = None
    """batch.memory_limit in bytes."""

    @property
    def auto_micro(self) -> bool:
        """The micro-batch adapts to memory: found at start, halved on out-of-memory."""
        return self.cfg.batch.micro_size == "auto"

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it; world size and micro-batch may change."""
        c = self.cfg
        fixed = {"batch.global_size": self.plan.global_batch, "run.seed": c.run.seed, "optim.name": c.optim.name}
        for section in ("data", "model"):
            fixed |= {f"{section}.{k}": v for k, v in dataclasses.asdict(getattr(c, section)).items() if k != "workers"}
        return fixed

    def derived(self) -> dict[str, Any]:
        """The values written beside the config in config.yaml."""
        return {
            "world_size": self.plan.world_size,
            "global_batch": self.plan.global_batch,
            "micro_batch": self.plan.micro_batch,
            "accum_steps": self.plan.accum_steps,
            "peak_lr": self.peak_lr,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "train_examples": len(self.task.train),
            "eval_examples": len(self.task.eval),
        }


def prepare(cfg: Config, world_size: int) -> Job:
    """Build the (small, deterministic) dataset, derive the batch plan, lengths and peak LR; raise UserError if any is impossible."""
    if cfg.batch.micro_size == "auto" and cfg.batch.accum_steps is not None:
        raise UserError("batch.micro_size=auto derives batch.accum_steps; drop batch.accum_steps")
    micro = None if cfg.batch.micro_size == "auto" else cfg.batch.micro_size
    plan = batch.plan(world_size, cfg.batch.global_size, micro, cfg.batch.accum_steps)
    task = data.build(cfg.data)
    models.check(cfg.model, task.input_shape)
    optim.check(cfg.optim)
    if cfg.train.noise_scale and plan.world_size == 1 and plan.accum_steps == 1 and cfg.batch.micro_size != "auto":
        raise UserError("train.noise_scale compares two batch sizes: run on 2+ processes or set batch.micro_size "
                        "below batch.global_size (accumulation)")
    steps_per_epoch = batch.steps_per_epoch(len(task.train), plan)
    if cfg.train.epochs is not None:
        total_steps = max(1, math.floor(cfg.train.epochs * steps_per_epoch))
    else:
        total_steps = cfg.train.steps or 100
    warmup_steps = cfg.schedule.warmup_steps or 0
    if cfg.schedule.warmup_epochs is not None:
        warmup_steps = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    if warmup_steps >= total_steps:
        raise UserError(
            f"warmup ({warmup_steps} steps) is not shorter than training ({total_steps} steps); "
            f"shorten schedule.warmup_steps/warmup_epochs or train longer"
        )
    lr = peak_lr(cfg.optim.lr, plan.global_batch, cfg.optim.reference_batch, cfg.optim.scaling)
    limit = memory.parse_size(cfg.batch.memory_limit, "batch.memory_limit") if cfg.batch.memory_limit else None
    job = Job(cfg, task, plan, steps_per_epoch, total_steps, warmup_steps, lr, None, limit)
    job.resume_from = _resume_point(job)
    return job


def _resume_point(job: Job) -> Path | None:
    """The checkpoint to resume from (per run.resume), checked against this run's identity."""
    resume = job.cfg.run.resume
    if resume == "never":
        return None
    path = checkpoint.latest_good(job.cfg.run_dir) if resume == "auto" else checkpoint.check_explicit(Path(resume))
    if path is None:
        return None
    saved = checkpoint.manifest(path)["meta"]
    for key, value in job.identity().items():
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint {path} was trained with {key}={saved.get(key)}, this config has {value}; "
                f"use the same config, or run.resume=never (or another run.dir) to start afresh"
            )
    return path
