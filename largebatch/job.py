"""Everything derived from the config and the world size, computed and checked before any process group starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largebatch import batch, batch_schedule, cbs, checkpoint, dist, memory, optim
from largebatch import task as tasks
from largebatch.config import Config
from largebatch.engine import engine_class
from largebatch.errors import UserError, warn
from largebatch.optim.scaling import peak_lr, scaling_rule, weight_decay_factor

CHECKPOINT_FORMAT = 6
"""Bumped when the checkpoint layout changes (2: optimizer state by parameter name, applied-step count;
3: the dataset's length and fingerprint in its identity; 4: the engine in its identity, engine shards beside state.pt;
5: the data position, examples trained and current global batch in the state, for batch-size schedules;
6: train.ignore_index in the identity: it decides which targets are loss terms)."""
CADENCE = ("log_every", "eval_every", "checkpoint_every", "checkpoint_keep")
"""train.* keys that only change how often things happen, not the trajectory; not reported on resume. Not
train.noise_every: under batch.schedule=gns the batch follows what it measures."""


@dataclass
class Job:
    cfg: Config
    task: tasks.Task | None
    """None only when planning without the data (`largebatch plan --examples`)."""
    train_examples: int
    plan: batch.BatchPlan
    """The plan at batch.global_size (a batch-size schedule starts smaller and grows to it)."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    resume_from: Path | None
    threads: int
    """CPU threads per process (dist.threads: run.threads, OMP_NUM_THREADS, or cores ÷ local processes)."""
    memory_limit: int | None = None
    """batch.memory_limit in bytes."""
    resumed_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """`settings()` of the checkpoint being resumed ({} when starting afresh)."""
    model: nn.Module | None = None
    """The model, built once (seeded with run.seed) and checked on the data: the instance the trainer trains. None
    when planning without the data."""
    rng_after_build: torch.Tensor | None = None
    """The CPU generator's state right after the build: training goes on from it, as if nothing ran in between."""

    @property
    def total_samples(self) -> int:
        """The run's length in examples: total_steps global batches of batch.global_size, whatever the schedule."""
        return self.total_steps * self.plan.global_batch

    @property
    def noise_every(self) -> int:
        """Steps between noise-scale measurements: train.noise_every, else 1 under batch.schedule=gns (the schedule
        follows the measurement), else train.log_every (measured where logged)."""
        train = self.cfg.train
        if train.noise_every is not None:
            return train.noise_every
        return 1 if self.cfg.batch.schedule == "gns" else train.log_every

    @property
    def auto_micro(self) -> bool:
        """The micro-batch adapts to memory: found at start, halved on out-of-memory."""
        return self.cfg.batch.micro_size == "auto"

    @property
    def weight_decay(self) -> float:
        """optim.weight_decay at batch.global_size: scaled there with optim.scale_weight_decay."""
        o = self.cfg.optim
        if not o.scale_weight_decay:
            return o.weight_decay
        return o.weight_decay * weight_decay_factor(
            self.plan.global_batch, o.reference_batch, scaling_rule(o)
        )

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must share with the run that resumes it; world size and micro-batch may change."""
        c = self.cfg
        fixed = {
            "batch.global_size": self.plan.global_batch,
            "run.seed": c.run.seed,
            "optim.name": c.optim.name,
            "optim.groups": [f"{g['match']} → {g['name']}" for g in c.optim.groups] or None,
            "train.loss": c.train.loss,
            "train.ignore_index": c.train.ignore_index,
            "data.train_examples": self.train_examples,
            "engine.name": c.engine.name,
            "engine.zero_stage": c.engine.zero_stage,
            "data.fingerprint": self.task.data.fingerprint if self.task else None,
        }
        for section in ("data", "model"):
            fixed |= {
                f"{section}.{k}": v
                for k, v in dataclasses.asdict(getattr(c, section)).items()
                if k not in ("workers", "path")
            }  # the same data may be mounted elsewhere: its fingerprint decides
        return fixed

    def settings(self) -> dict[str, Any]:
        """What a resume may change (applied from the resumed step on, and reported): optimizer, LR and batch-size
        schedules, training options and the batch split."""
        c = self.cfg
        flat = {
            f"{section}.{k}": v
            for section in ("optim", "schedule", "train")
            for k, v in dataclasses.asdict(getattr(c, section)).items()
            if k not in CADENCE
        }
        flat |= {
            f"batch.{k}": getattr(c.batch, k)
            for k in ("schedule", "start_size", "ramp_samples", "thresholds", "threshold_unit")
        }
        return {**flat, "micro_batch": self.plan.micro_batch, "world_size": self.plan.world_size}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**self.identity(), "format": CHECKPOINT_FORMAT, "settings": self.settings()}

    def derived(self) -> dict[str, Any]:
        """The values written beside the config in config.yaml."""
        return {
            "world_size": self.plan.world_size,
            "global_batch": self.plan.global_batch,
            "micro_batch": self.plan.micro_batch,
            "accum_steps": self.plan.accum_steps,
            "peak_lr": self.peak_lr,
            "scaling": scaling_rule(self.cfg.optim),
            **(
                {"batch_schedule": batch_schedule.build(self.cfg, self.plan).describe()}
                if self.cfg.batch.schedule != "constant"
                else {}
            ),
            **({"weight_decay": self.weight_decay} if self.cfg.optim.scale_weight_decay else {}),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "threads": self.threads,
            "train_examples": self.train_examples,
            "eval_examples": len(self.task.eval)
            if self.task and self.task.eval is not None
            else None,
            **({"noise_every": self.noise_every} if self.cfg.train.noise_scale else {}),
        }


def prepare(
    cfg: Config, world_size: int, train_examples: int | None = None, task: tasks.Task | None = None
) -> Job:
    """Open the data (or take `task`), build the model and check it on two examples, derive the batch plan, lengths
    and peak LR; raise UserError if any is impossible. With `train_examples`, plan for a training set of that size
    without reading any data or building the model."""
    if cfg.batch.micro_size == "auto" and cfg.batch.accum_steps is not None:
        raise UserError("batch.micro_size=auto derives batch.accum_steps; drop batch.accum_steps")
    micro = batch_schedule.micro_size(cfg.batch, world_size)
    plan = batch.plan(world_size, cfg.batch.global_size, micro, cfg.batch.accum_steps)
    model = rng_after_build = None
    if train_examples is None:
        task = task or tasks.build(cfg)
        torch.manual_seed(cfg.run.seed)
        model = task.build_model()
        rng_after_build = torch.get_rng_state()
        tasks.check(task, model, cfg.model.name)
        train_examples = len(task.train)
    optim.check(cfg.optim, model)
    engine_class(cfg.engine.name).check(cfg, plan, model)
    if (
        cfg.train.noise_scale
        and plan.world_size == 1
        and plan.accum_steps == 1
        and cfg.batch.micro_size != "auto"
    ):
        raise UserError(
            "train.noise_scale compares two batch sizes: run on 2+ processes or set batch.micro_size "
            "below batch.global_size (accumulation)"
        )
    steps_per_epoch = batch.steps_per_epoch(train_examples, plan)
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
    lr = peak_lr(
        cfg.optim.lr, plan.global_batch, cfg.optim.reference_batch, scaling_rule(cfg.optim)
    )
    limit = (
        memory.parse_size(cfg.batch.memory_limit, "batch.memory_limit")
        if cfg.batch.memory_limit
        else None
    )
    job = Job(
        cfg,
        task,
        train_examples,
        plan,
        steps_per_epoch,
        total_steps,
        warmup_steps,
        lr,
        None,
        dist.threads(cfg.run.threads),
        limit,
        model=model,
        rng_after_build=rng_after_build,
    )
    job.resume_from = (
        _resume_point(job) if task is not None else None
    )  # planning only: nothing to resume
    cbs.check(job)
    return job


def _resume_point(job: Job) -> Path | None:
    """The checkpoint to resume from (per run.resume), checked against this run's identity."""
    resume = job.cfg.run.resume
    if resume == "never":
        return None
    path = (
        checkpoint.latest_good(job.cfg.run_dir)
        if resume == "auto"
        else checkpoint.check_explicit(Path(resume))
    )
    if path is None:
        return None
    saved = checkpoint.manifest(path)["meta"]
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} was written by an older largebatch (format {saved.get('format', 1)}, "
            f"this one reads {CHECKPOINT_FORMAT}); resume it with that version, or run.resume=never"
        )
    for key, value in job.identity().items():
        if saved.get(key) != value:
            raise UserError(
                f"checkpoint {path} was trained with {key}={saved.get(key)}, this config has {value}; "
                f"use the same config, or run.resume=never (or another run.dir) to start afresh"
            )
    job.resumed_settings = saved["settings"]
    changed = [
        f"{k} {saved['settings'].get(k)} → {v}"
        for k, v in job.settings().items()
        if k.startswith(("optim.", "schedule.", "train.", "batch."))
        and saved["settings"].get(k) != v
    ]
    if changed:
        warn(
            f"resuming {path.name} with changed settings, applied from its step on: {', '.join(changed)}"
        )
    return path
