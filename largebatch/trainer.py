"""The training loop: one optimizer step per global batch, accumulated over micro-steps."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largebatch import autobatch, batch_schedule, checkpoint, config, counted_loss, flops, optim
from largebatch.batch import BatchPlan, GlobalBatchSampler, Position, advance
from largebatch.cbs import during_run as measure_critical_batch
from largebatch.dist import DistInfo, all_reduce_sum, broadcast_from_main, process_age_s
from largebatch.engine import Engine, engine_class
from largebatch.errors import Preempted, TrainingStopped, warn
from largebatch.job import Job
from largebatch.memory import process_peak_mib
from largebatch.noise import NoiseScale
from largebatch.optim import fused
from largebatch.optim.hyper import Hyperparameters
from largebatch.optim.schedules import Schedule
from largebatch.precision import StepOutcome
from largebatch.stop import StopFlags
from largebatch.task import Batch, Task, collate_of, correct, take, to_device
from largebatch.track import Tracker


@dataclass
class TrainState:
    """Everything a checkpoint must hold to resume bit-exactly."""

    engine: Engine
    noise: NoiseScale | None
    global_batch: int
    """The global batch of the next step (it changes under a batch-size schedule)."""
    step: int = 0
    """Optimizer steps taken, applied or skipped."""
    samples: int = 0
    """Examples trained on (the global batches of all steps taken): the run ends at job.total_samples."""
    position: Position = (0, 0)
    """Where the next global batch starts in the data: (epoch, offset)."""
    applied_steps: int = 0
    applied_samples: int = 0
    """Examples of the steps whose update was applied: the position in the LR schedule."""
    nonfinite_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.engine.state_dict(),
            "noise": self.noise.state_dict() if self.noise else None,
            "rng": torch.get_rng_state(),
            "nonfinite_steps": self.nonfinite_steps,
            **{
                k: getattr(self, k)
                for k in (
                    "global_batch",
                    "step",
                    "samples",
                    "position",
                    "applied_steps",
                    "applied_samples",
                )
            },
        }

    def load(self, path: Path) -> None:
        """Resume from the checkpoint at `path` (collective)."""
        state = checkpoint.load(path)
        self.engine.load_state_dict(state, path)
        if self.noise is not None and state["noise"] is not None:
            self.noise.load_state_dict(state["noise"])
        torch.set_rng_state(state["rng"])
        for key in (
            "global_batch",
            "step",
            "samples",
            "applied_steps",
            "applied_samples",
            "nonfinite_steps",
        ):
            setattr(self, key, state[key])
        self.position = tuple(state["position"])


def build_state(job: Job, info: DistInfo) -> TrainState:
    """The model job.prepare built and checked, with its optimizer and precision in their engine (any kernel they
    compile built now, before training is timed), then the checkpoint rank 0 chose to resume from, if any."""
    cfg = job.cfg
    # CUDA's generators from the seed; the CPU one goes on from where the build left it.
    torch.manual_seed(cfg.run.seed)
    torch.set_rng_state(job.rng_after_build)
    engine = engine_class(cfg.engine.name)(
        job.model,
        lambda module: optim.build(module, cfg.optim, job.peak_lr),
        cfg,
        job.plan,
        info,
    )
    fused.warm(engine.optimizer)
    state = TrainState(
        engine,
        NoiseScale() if cfg.train.noise_scale else None,
        batch_schedule.first_size(cfg.batch, job.plan),
    )
    resume_from = broadcast_from_main(job.resume_from)
    if resume_from is not None:
        state.load(resume_from)
    return state


class Batches:
    """This rank's micro-batches from a given step on, under a given plan (rebuilt when the plan changes)."""

    def __init__(self, job: Job, info: DistInfo) -> None:
        self.job, self.info = job, info
        self._it = iter(())

    def restart(self, plan: BatchPlan, position: Position, samples: int) -> None:
        """Batches of `plan` from `position` on, as many as the run has left after `samples` examples."""
        dataset = self.job.task.train
        steps = -(-(self.job.total_samples - samples) // plan.global_batch)
        sampler = GlobalBatchSampler(
            len(dataset),
            plan,
            self.info.rank,
            self.job.cfg.run.seed,
            steps,
            position,
            draws=getattr(dataset, "epoch_aware", False),
        )
        workers, pin = self.job.cfg.data.workers, self.info.device.type == "cuda"
        if not workers and not pin:  # what the DataLoader would do, without its ≈ 60 µs a batch
            self._it = (take(dataset, indices) for indices in sampler)
            return
        self._it = iter(
            torch.utils.data.DataLoader(
                dataset,
                batch_sampler=sampler,
                collate_fn=collate_of(dataset),
                num_workers=workers,
                pin_memory=pin,
                prefetch_factor=4 if workers else None,
                # its workers' seeds from the run's seed, not from training's generator (dropout): a run draws
                # the same masks with and without workers
                generator=torch.Generator().manual_seed(self.job.cfg.run.seed),
            )
        )

    def next(self) -> Batch:
        return to_device(next(self._it), self.info.device)


@dataclass
class Sums:
    """This rank's totals over the micro-steps of one step."""

    loss: torch.Tensor
    """Sum of the loss terms."""
    count: torch.Tensor
    """Number of loss terms (valid targets)."""
    first: tuple[float, int] | None
    """Noise scale on one process: (squared gradient norm, batch size) of the first micro-batch alone."""


@dataclass
class StepResult:
    """What one optimizer step measured, for the log record and the stop decision."""

    loss: float
    grad_norm: float
    lr: float
    outcome: StepOutcome
    small_batch: tuple[float, int] | None
    """(squared gradient norm, batch size) of the noise scale's small batch, on measuring steps (every
    job.noise_every steps)."""
    stop_signal: int


def fit(job: Job, info: DistInfo) -> dict[str, Any]:
    """Train `job` on this rank (process group already joined); rank 0 writes the run directory. Returns the summary."""
    return Trainer(job, info).fit()


class Trainer:
    """One rank's run: `fit()` steps to the end, or to a stop every rank agreed on (signal, fault, non-finite)."""

    def __init__(self, job: Job, info: DistInfo) -> None:
        self.job, self.info, self.cfg = job, info, job.cfg
        torch.set_num_threads(job.threads)
        if torch.are_deterministic_algorithms_enabled() != self.cfg.run.deterministic:
            torch.use_deterministic_algorithms(
                self.cfg.run.deterministic
            )  # its call imports torch._inductor: 2 s
        self.state = build_state(job, info)
        self.engine, self.optimizer = self.state.engine, self.state.engine.optimizer
        self.engine.model.train()  # once: evaluate() puts the model back in training mode
        self.hyper = Hyperparameters(
            self.optimizer,
            self.cfg.optim,
            Schedule(self.cfg.schedule, job.total_steps, job.warmup_steps),
            job.plan.global_batch,
        )
        self.batch_schedule = batch_schedule.build(self.cfg, job.plan)
        self.plan = batch_schedule.at(job.plan, self.state.global_batch)
        self.budget = autobatch.budget_bytes(job.memory_limit, info.device)
        self.meter = (
            autobatch.training_meter(self.budget, self.engine.module, self.optimizer, info.device)
            if job.auto_micro
            else None
        )
        self.injected_oom = autobatch.InjectedOutOfMemory(self.engine.module, info.rank)
        self.flags = StopFlags(self.cfg.run_dir)
        self.batches = Batches(job, info)
        self.target = config.Target.parse(self.cfg.train.target) if self.cfg.train.target else None
        self.reached: dict[str, Any] | None = None
        """Where train.target was first met: {step, samples, value}."""
        self.warned_target = False
        self.first_step_s: float | None = None
        """Seconds from this process's start to the end of its first step (`largebatch bench start`)."""

    def fit(self) -> dict[str, Any]:
        self._start()
        self.flags.install()
        try:
            while self.state.samples < self.job.total_samples and self.reached is None:
                result = self.train_step()
                if self.first_step_s is None:
                    self.first_step_s = process_age_s()
                self._update_noise(result)
                self._after_step(result)
                if self.cfg.train.cbs_every and self.state.step % self.cfg.train.cbs_every == 0:
                    measure_critical_batch(self)
                self._follow_batch_schedule()
        finally:
            self.flags.uninstall()
        return self._finish()

    def _start(self) -> None:
        """Fix the batch plan, write config.yaml and open the metrics (rank 0), and agree that it worked."""
        job, info, s = self.job, self.info, self.state
        self._check_same_data()
        if job.auto_micro:
            largest = (
                self.plan.per_rank // 2 if s.noise is not None and info.world_size == 1 else None
            )
            plan = autobatch.fit(
                self.plan,
                self.engine.module,
                self.optimizer,
                self._probe,
                self.budget,
                info.device,
                largest,
            )
            self.job = job = dataclasses.replace(job, plan=plan)
            self.plan = plan
        self._set_batch(self.batch_schedule.size(s.global_batch, s.samples, self._noise_scale()))
        self._warn_batchnorm()
        self._warn_cpu_fp16()
        self.tracker = Tracker(job, False, s.step)
        self.throughput = flops.measure(
            self.engine.module, job.task, self.plan.micro_batch, self.cfg.train.precision, info
        )
        if info.is_main:
            print(
                f"{job.plan.describe()}; {self.hyper.describe()}; {job.total_steps} steps "
                f"({job.steps_per_epoch} per epoch), warmup {job.warmup_steps}; {job.threads} threads",
                flush=True,
            )
            print(self.throughput.described, flush=True)
            if split := optim.split.describe(self.optimizer):
                print(split, flush=True)
            if self.cfg.batch.schedule != "constant":
                print(
                    f"batch.schedule={self.cfg.batch.schedule}: {self.batch_schedule.describe()}; global batch "
                    f"{self.plan.global_batch} now; {job.total_samples} examples in all",
                    flush=True,
                )
            if job.resume_from is not None:
                print(f"resuming from {job.resume_from} at step {s.step}", flush=True)
            with self.flags.guard(str(self.cfg.run_dir)):
                self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
                config.dump(self.cfg, self._derived(), self.cfg.run_dir / "config.yaml")
                for name, content in self.engine.files().items():
                    (self.cfg.run_dir / name).write_text(json.dumps(content, indent=2) + "\n")
                self.tracker = Tracker(job, True, s.step)
        self.flags.agree_now(info.device)
        self.batches.restart(self.plan, s.position, s.samples)
        self.start = self.last_log = time.perf_counter()
        self.first_samples = self.last_logged_samples = s.samples
        # valid targets since this start, for tokens/s (not checkpointed: a resumed run counts afresh)
        self.tokens = self.last_logged_tokens = 0.0
        self.eval_s = 0.0

    def _derived(self) -> dict[str, Any]:
        """config.yaml's `derived`: the job's values and the engine's."""
        return {
            **self.job.derived(),
            **self.engine.derived(),
            **optim.split.derived(self.optimizer),
        }

    def _noise_scale(self) -> float | None:
        return self.state.noise.value if self.state.noise is not None else None

    def _follow_batch_schedule(self) -> None:
        """Between steps: if the batch-size schedule asks for another global batch, change accumulation (every
        rank computes the same size from the same all-reduced values), restart the data there and rescale the LR."""
        size = self.batch_schedule.size(
            self.state.global_batch, self.state.samples, self._noise_scale()
        )
        if size == self.plan.global_batch:
            return
        before = self.plan
        self._set_batch(size)
        self.batches.restart(self.plan, self.state.position, self.state.samples)
        if self.info.is_main:
            print(
                f"step {self.state.step}: global batch {before.global_batch} → {self.plan.global_batch} "
                f"({self.plan.describe()}); "
                f"{self.hyper.describe_change(before.global_batch, self.plan.global_batch)}",
                flush=True,
            )

    def _set_batch(self, size: int) -> None:
        """Train the next steps with a global batch of `size`: its plan, its LR (and β2) by the scaling rules."""
        self._use_plan(
            self.plan if size == self.plan.global_batch else batch_schedule.at(self.job.plan, size)
        )

    def _use_plan(self, plan: BatchPlan) -> None:
        """Train the next steps under `plan`: the engine's accumulation, the LR (and β2) for its global batch."""
        self.plan, self.state.global_batch = plan, plan.global_batch
        self.engine.set_plan(plan)
        self.hyper.set(plan.global_batch, self.state.applied_samples)

    def restart_at(
        self, plan: BatchPlan, position: Position, applied_samples: int, samples: int
    ) -> None:
        """Train the next steps under `plan` from data `position`, the LR schedule at `applied_samples`, `samples`
        examples counted as done (the sampler serves what the run has left); a branch of `largebatch cbs` starts so."""
        state = self.state
        state.position, state.applied_samples, state.samples = position, applied_samples, samples
        self._use_plan(plan)
        self.batches.restart(plan, position, samples)
        self.tokens = 0.0  # as `_start` sets it, for tokens/s

    def _check_same_data(self) -> None:
        """Every rank must read the same data: a node with another copy would take other steps, or hang."""
        mine = (self.job.train_examples, self.job.task.data.fingerprint)
        differs = torch.tensor([float(broadcast_from_main(mine) != mine)], device=self.info.device)
        if all_reduce_sum(differs).item():
            raise TrainingStopped(
                "some ranks read other data than rank 0 (another training-set length or "
                "fingerprint); give every node the same data at data.path"
            )

    def train_step(self) -> StepResult:
        """One optimizer step over one global batch: micro-steps, gradient sync, one agreement, clip, step, LR."""
        s, info = self.state, self.info
        measuring = s.noise is not None and (s.step + 1) % self.job.noise_every == 0
        across_ranks = measuring and info.world_size > 1
        redo = self.job.auto_micro and self.engine.redoes_micro_steps
        manual_sync = redo or (across_ranks and not self.engine.measures_in_reduction)
        if redo:
            sums = self._accumulate_or_shrink(measuring)
        elif self.job.auto_micro:
            sums = self._accumulate_or_stop(manual_sync, measuring)
        else:
            sums = self.accumulate(manual_sync, measuring)
        local_sq = self._local_sq(sums) if across_ranks else 0.0
        if manual_sync:
            self.engine.reduce_gradients()
        share = self.engine.norm_share()  # sharded gradients: their global norm rides the agreement
        mine = torch.stack(
            [sums.loss, sums.count, torch.zeros_like(sums.count) if share is None else share]
        )
        mine = mine.double()
        summed = all_reduce_sum(
            torch.cat([mine, mine.new_tensor([local_sq, *self.flags.values()])])
        ).tolist()
        stop_signal = self.flags.agree(summed[4:])
        loss_sum, count, norm_sq, sq_sum = summed[:4]
        small = None
        if measuring:
            small = (sq_sum / info.world_size, self.plan.per_rank) if across_ranks else sums.first
        loss = counted_loss.normalise(self.engine, self.plan, loss_sum, count)
        lr = self.optimizer.param_groups[0]["lr"]
        outcome = self.engine.step(loss, self.cfg.train.clip_grad_norm, norm_sq)
        s.step += 1
        s.samples += self.plan.global_batch
        self.tokens += count  # valid targets, for tokens/s
        s.position = advance(s.position, self.plan.global_batch, self.job.train_examples)
        s.applied_steps += outcome.applied
        s.applied_samples += outcome.applied * self.plan.global_batch
        s.nonfinite_steps += outcome.nonfinite
        if outcome.nonfinite and self.cfg.train.nonfinite == "stop":
            raise TrainingStopped(
                f"non-finite loss or gradient at step {s.step} (train.nonfinite=stop); "
                f"lower optim.lr, set train.clip_grad_norm or use train.precision=fp32"
            )
        self.hyper.set(self.plan.global_batch, s.applied_samples)
        return StepResult(loss, outcome.grad_norm, lr, outcome, small, stop_signal)

    def accumulate(self, manual_sync: bool, measuring: bool) -> Sums:
        """Forward and backward over this rank's micro-batches of the step; gradients sync on the last one (or,
        with `manual_sync`, not at all: the caller all-reduces once every rank got through).

        Each micro-step back-propagates `counted_loss.micro_loss`; `train_step` normalises after its all-reduce."""
        plan, info = self.plan, self.info
        loss_sum, count = torch.zeros((), device=info.device), torch.zeros((), device=info.device)
        first = None
        for micro_step in range(plan.accum_steps):
            inputs, targets = self.batches.next()
            last = micro_step == plan.accum_steps - 1
            self.injected_oom.arm(self.state.step + 1, last)
            with self.engine.micro_step(not manual_sync and last):
                with (
                    self.meter.track(self.engine.module)
                    if self.meter
                    else contextlib.nullcontext(),
                    self.engine.autocast(),
                ):
                    total, terms, _ = self.job.task.score(self.engine.model, inputs, targets)
                self.engine.backward(counted_loss.micro_loss(total, plan))
            loss_sum += total.detach().float()
            count += terms
            if micro_step == 0 and measuring and info.world_size == 1:
                sq = counted_loss.small_batch_sq(self.engine.local_grad_sq(), plan, float(terms))
                first = (sq, plan.micro_batch)
        return Sums(loss_sum, count, first)

    def _local_sq(self, sums: Sums) -> float:
        """This rank's share of the noise scale's small batch: the squared norm of its own gradient before the
        reduction, over its own count of terms (the train step averages it over ranks in its one all-reduce)."""
        return counted_loss.small_batch_sq(
            self.engine.local_grad_sq(), self.plan, float(sums.count)
        )

    def _update_noise(self, result: StepResult) -> None:
        """Fold a measuring step's small and global batch into the smoothed noise scale (what batch.schedule=gns
        follows): on its own cadence, so that logging never changes the trajectory."""
        small, plan = result.small_batch, self.plan
        if (
            small is not None
            and math.isfinite(result.grad_norm)
            and math.isfinite(small[0])
            and small[1] < plan.global_batch
        ):
            self.state.noise.update(*small, result.grad_norm**2, plan.global_batch)

    def _accumulate_or_shrink(self, measuring: bool) -> Sums:
        """Run the step's micro-steps unsynchronised; if any rank ran out of memory, all halve the micro-batch
        and redo the step (its loss counted once). The caller all-reduces the gradients."""
        while True:
            try:
                result, ok = self.accumulate(True, measuring), 1
            except torch.OutOfMemoryError:
                result, ok = None, 0
            if autobatch.agree_min(ok, self.info.device):
                return result
            self.optimizer.zero_grad(set_to_none=True)
            autobatch.release(self.info.device)
            smaller = autobatch.smaller(self.plan)
            step = self.state.step + 1
            if smaller is None:
                raise TrainingStopped(
                    f"out of memory at step {step} even with micro-batch 1; "
                    f"raise batch.memory_limit or use model.grad_checkpointing"
                )
            warn(
                f"out of memory at step {step} with micro-batch {self.plan.micro_batch}; "
                f"redoing the step as {smaller.describe()}"
            )
            self.job = dataclasses.replace(self.job, plan=smaller)
            self.plan = smaller
            if self.info.is_main:  # config.yaml records the plan the run trains with from here on
                with self.flags.guard(str(self.cfg.run_dir / "config.yaml")):
                    config.dump(self.cfg, self._derived(), self.cfg.run_dir / "config.yaml")
            self.batches.restart(self.plan, self.state.position, self.state.samples)

    def _accumulate_or_stop(self, manual_sync: bool, measuring: bool) -> Sums:
        """`accumulate` on an engine that cannot redo a step (its micro-steps are collective): an out-of-memory error
        ends every rank in one line, from the rank that hit it, since its peers may be inside a collective."""
        try:
            return self.accumulate(manual_sync, measuring)
        except torch.OutOfMemoryError:
            autobatch.stop_alone(
                f"out of memory at step {self.state.step + 1} on engine.name={self.cfg.engine.name}, which cannot "
                f"redo a step; set batch.micro_size={max(1, self.plan.micro_batch // 2)} "
                f"or raise batch.memory_limit"
            )
        except RuntimeError:
            # a collective failed because a peer stopped alone: that peer printed the one line
            if autobatch.peer_stopped():
                os._exit(1)
            raise

    def _probe(self, micro: int) -> None:
        """One forward and backward of `micro` training examples, for autobatch to measure."""
        task = self.job.task
        inputs, targets = to_device(take(task.train, range(micro)), self.info.device)
        with self.engine.autocast():
            total, _, _ = task.score(self.engine.module, inputs, targets)
        total.backward()

    def _after_step(self, result: StepResult) -> None:
        """Log, evaluate and checkpoint on their cadence; on an agreed signal, checkpoint and stop."""
        s, train = self.state, self.cfg.train
        last = s.samples >= self.job.total_samples
        eval_now = bool(train.eval_every and s.step % train.eval_every == 0) or last
        if s.step % train.log_every == 0 or eval_now or result.outcome.nonfinite:
            self._log(result, eval_now)
        if result.stop_signal:
            self._save_checkpoint()
            self.flags.agree_now(self.info.device)
            raise Preempted(result.stop_signal, s.step)
        if train.checkpoint_every and (s.step % train.checkpoint_every == 0 or last):
            self._save_checkpoint()

    def _log(self, result: StepResult, eval_now: bool) -> None:
        if eval_now and self.info.device.type == "cuda":
            # the step's queued kernels (its optimizer step) count as training time, not as the evaluation's
            torch.cuda.synchronize(self.info.device)
        s, plan, now = self.state, self.plan, time.perf_counter()
        record = {
            "step": s.step,
            "samples": s.samples,
            "epoch": self._epoch(),
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "samples_per_s": (s.samples - self.last_logged_samples) / (now - self.last_log),
            **self.throughput.rates(
                s.samples - self.last_logged_samples,
                self.tokens - self.last_logged_tokens,
                now - self.last_log,
            ),
            "global_batch": plan.global_batch,
            "micro_batch": plan.micro_batch,
            "accum_steps": plan.accum_steps,
            "memory_mib": process_peak_mib(self.info.device),
            "nonfinite_steps": s.nonfinite_steps,
            "applied_steps": s.applied_steps,
            **optim.trust_ratios(self.engine.module, self.optimizer),
            **optim.update_rms(self.engine.module, self.optimizer),
        }
        if self.engine.loss_scale is not None:
            record["loss_scale"] = self.engine.loss_scale
        if s.noise is not None:
            record.update(s.noise.record())
        if eval_now:
            self.engine.sync_buffers()
            metrics = evaluate(
                self.engine.module,
                self.job.task,
                self.info,
                2 * plan.micro_batch,
                self.cfg.data.workers,
            )
            record.update({f"eval/{k}": v for k, v in metrics.items()})
            self.eval_s += time.perf_counter() - now
            if self.target is not None and self.target.met(
                record
            ):  # eval metrics are all-reduced: every rank agrees
                self.reached = {
                    "step": s.step,
                    "samples": s.samples,
                    "value": record[self.target.key],
                }
            elif (
                self.target is not None and self.target.key not in record and not self.warned_target
            ):
                given = ", ".join(f"eval/{k}" for k in metrics) or "no metric"
                warn(
                    f"train.target={self.cfg.train.target}: the evaluation gives {given}, not {self.target.key}, so "
                    f"the run will not stop early"
                )
                self.warned_target = True
        with self.flags.guard(f"{self.cfg.run_dir}/metrics.jsonl"):
            self.tracker.log(record)
        self.last_log, self.last_logged_samples = time.perf_counter(), s.samples
        self.last_logged_tokens = self.tokens

    def _epoch(self) -> float:
        """Epochs done: whole ones, plus the fraction of an epoch's full-size batches (batch.global_size) taken."""
        epoch, offset = self.state.position
        return epoch + offset / (self.job.steps_per_epoch * self.job.plan.global_batch)

    def _save_checkpoint(self) -> None:
        """A checkpoint of this step, with rank 0's buffers on every rank (collective; a failed write stops all)."""
        self.engine.sync_buffers()
        checkpoint.save_collective(
            self.engine,
            self.cfg.run_dir,
            self.state.step,
            self.state.state_dict(),
            self.job.checkpoint_meta(),
            self.cfg.train.checkpoint_keep,
            self.flags,
            self.info,
        )

    def _warn_batchnorm(self) -> None:
        """BatchNorm normalises per micro-batch, so a changed split changes the gradient: say so once."""
        if not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.engine.module.modules()
        ):
            return
        resumed = self.job.resumed_settings.get("micro_batch")
        if (
            self.plan.accum_steps > 1
            or self.job.auto_micro
            or resumed not in (None, self.plan.micro_batch)
        ):
            warn(
                f"BatchNorm normalises each micro-batch of {self.plan.micro_batch} examples, so this run's gradients "
                f"depend on the micro-batch split (accumulation, micro_size=auto or a resume at another micro-batch); "
                f"use model.norm=group or layer for results that do not"
            )

    def _warn_cpu_fp16(self) -> None:
        """fp16 convolutions on a CPU train at a fraction of fp32's speed (no fast fp16 backward there): say so once."""
        if (
            self.cfg.train.precision == "fp16"
            and self.info.device.type == "cpu"
            and any(isinstance(m, nn.modules.conv._ConvNd) for m in self.engine.module.modules())
        ):
            warn(
                "train.precision=fp16 on CPU: PyTorch has no fast fp16 convolution backward there (the quickstart's "
                "ResNet trains about 9x slower than in fp32); use train.precision=bf16 on CPU"
            )

    def _finish(self) -> dict[str, Any]:
        s, plan, job = self.state, self.plan, self.job
        if s.nonfinite_steps:
            warn(f"{s.nonfinite_steps} step(s) had a non-finite loss or gradient and were skipped")
        wall_s = time.perf_counter() - self.start
        summary = {
            "steps": s.step,
            "samples": s.samples,
            "final_loss": self.tracker.last.get("loss"),
            "eval": {
                k.removeprefix("eval/"): v
                for k, v in self.tracker.last.items()
                if k.startswith("eval/")
            },
            "wall_s": wall_s,
            "samples_per_s": (s.samples - self.first_samples) / max(wall_s - self.eval_s, 1e-9),
            **self.throughput.rates(
                s.samples - self.first_samples,
                self.tokens,
                wall_s - self.eval_s,
            ),
            "world_size": plan.world_size,
            "global_batch": plan.global_batch,
            "micro_batch": plan.micro_batch,
            "accum_steps": plan.accum_steps,
            "peak_lr": job.peak_lr,
            "threads": job.threads,
            "applied_steps": s.applied_steps,
            "nonfinite_steps": s.nonfinite_steps,
            "first_step_s": self.first_step_s,
        }
        if self.target is not None:
            summary["target"] = {
                "key": self.target.key,
                "value": self.target.value,
                "reached": self.reached,
            }
        weights = self.engine.full_state_dict()
        summary["params_sha256"] = params_sha256(weights)
        if self.info.is_main:
            with self.flags.guard(f"{self.cfg.run_dir}/summary.json and model.pt"):
                self.tracker.finish(summary)
                # Through a Python file: a full disk keeps its errno (torch's C++ writer drops it).
                with (self.cfg.run_dir / "model.pt").open("wb") as f:
                    torch.save(weights, f)
        self.flags.agree_now(self.info.device)
        return summary


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, info: DistInfo, batch_size: int, workers: int = 0
) -> dict[str, float]:
    """Mean loss over the held-out loss terms (and accuracy where the output is class logits), sharded over ranks.

    Every rank runs the same number of forward passes (a sharded model's forward is collective): one with fewer
    examples repeats its first batch, or example 0, and does not count it."""
    if task.eval is None or len(task.eval) == 0:
        return {}
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=info.device)
    mine = list(range(info.rank, len(task.eval), info.world_size))
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    rounds = math.ceil(math.ceil(len(task.eval) / info.world_size) / batch_size)
    counted_chunks = len(chunks)
    chunks += [chunks[0] if chunks else [0]] * (rounds - counted_chunks)
    loader = torch.utils.data.DataLoader(  # its own generator: eval leaves training's (dropout) untouched
        task.eval,
        batch_sampler=chunks,
        collate_fn=collate_of(task.eval),
        num_workers=workers,
        generator=torch.Generator(),
    )
    for i, batch in enumerate(loader):
        inputs, targets = to_device(batch, info.device)
        total, count, output = task.score(model, inputs, targets)
        if i >= counted_chunks:
            continue
        right, counted = correct(output, targets, task.ignore_index) or (0, 0)
        totals += torch.stack(
            [
                torch.as_tensor(v, device=info.device).double()
                for v in (total, count, right, counted)
            ]
        )
    loss, count, right, counted = all_reduce_sum(totals).tolist()
    model.train()
    return {
        "loss": loss / count if count else math.nan,
        **({"accuracy": right / counted} if counted else {}),
    }


def params_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of every tensor in a model's state dict, by name, so two runs can be checked for bit-identity."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()
