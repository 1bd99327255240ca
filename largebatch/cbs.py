"""The critical batch measured by branching: `largebatch cbs` from a checkpoint, `train.cbs_every` during a run.

Merrill, Arora, Groeneveld, Hajishirzi 2025 ("Critical batch size revisited", OLMo): from one point of training,
run short continuations at several global batches B, each for the same N examples from the same data position with
the LR the scaling rule (optim.scaling) gives at B; the critical batch is the largest B whose loss after N examples is
within a tolerance of the smallest batch's. Here the loss is the held-out eval loss (the same examples for every
branch, so no sampling noise of its own), and the tolerance is a fraction of the smallest batch's progress:
B is within it when L(B) − L(B_min) ≤ tolerance × (L_0 − L(B_min)), L_0 the loss at the branch point. With the
default 0.5 a batch within tolerance makes at least half the smallest batch's progress per example, so it needs at
most about twice its examples: McCandlish et al.'s B_crit (E = 2·E_min at B = B_noise) where progress is linear in
examples. Repeats start N examples further on in the data each and give the interval.

A branch keeps the parameters, the optimizer's moments (momentum, Adam's m and v) and the loss scale; it continues
the LR schedule from the branch point (by examples, as a batch-size schedule does) at the scaling rule's LR for its
batch; its sampler starts at the branch point's data position (epoch, offset). Nothing is written: branches live in
memory, on copies, and the parent run (its parameters, optimizer, RNG, data order) goes on as if none ran.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from largebatch import batch, config, job, noise_probe
from largebatch.dist import DistInfo
from largebatch.errors import UserError
from largebatch.noise import NoiseScale

if TYPE_CHECKING:
    from largebatch.trainer import Trainer

TOLERANCE = 0.5
"""Default tolerance: a fraction of the smallest batch's loss reduction over the branch (see the module doc)."""
EXAMPLES_PER_LARGEST = 8
"""Default example budget N: this many global batches of the largest size (its branch takes 8 steps)."""
REPEATS = 3
"""`largebatch cbs` default: branches from 3 data positions (train.cbs_every measures once)."""
RECORD = "cbs.jsonl"
"""Where train.cbs_every appends one line per measurement, in the run directory."""
KEEPS = (
    "a branch keeps the parameters, optimizer moments and loss scale, continues the LR schedule from the branch "
    "point at its batch's scaled LR, and reads from the branch point's data position"
)


@dataclass
class Measurement:
    """Eval losses after N examples at each size, from one branch point, and the critical batch they give."""

    sizes: list[int]
    examples: int
    tolerance: float
    start_loss: float
    """Eval loss at the branch point (L_0)."""
    losses: list[list[float]]
    """[repeat][size] eval loss after the branch's N examples."""

    @property
    def mean_losses(self) -> list[float]:
        return [float(v) for v in np.mean(self.losses, axis=0)]

    def within(self, losses: list[float]) -> list[bool]:
        """Whether each size's loss is within tolerance of the smallest size's (a fraction of its progress)."""
        progress = self.start_loss - losses[0]
        return [loss - losses[0] <= self.tolerance * progress for loss in losses]

    def critical_of(self, losses: list[float]) -> int | None:
        """The largest size within tolerance; None when the smallest batch made no progress to measure against."""
        if not self.start_loss - losses[0] > 0:
            return None
        return max(b for b, ok in zip(self.sizes, self.within(losses)) if ok)

    @property
    def critical(self) -> int | None:
        """From the losses averaged over repeats."""
        return self.critical_of(self.mean_losses)

    @property
    def interval(self) -> tuple[int | None, int | None]:
        """[lowest critical size of any repeat, the next size above the highest one]: the critical batch lies in
        it, with the grid's step and the repeats' spread; the upper end is None (unbounded) when the largest size
        was within tolerance."""
        found = [self.critical_of(losses) for losses in self.losses]
        if None in found:
            return None, None
        above = [b for b in self.sizes if b > max(found)]
        return min(found), above[0] if above else None

    def record(self) -> dict[str, Any]:
        low, high = self.interval
        return {
            "sizes": self.sizes,
            "examples": self.examples,
            "tolerance": self.tolerance,
            "start_loss": self.start_loss,
            "losses": self.losses,
            "mean_losses": self.mean_losses,
            "critical_batch": self.critical,
            "interval": [low, high],
        }


def default_examples(sizes: list[int]) -> int:
    return EXAMPLES_PER_LARGEST * math.lcm(*sizes)


def check_sizes(
    sizes: list[int], examples: int, quantum: int, train_examples: int, where: str, budget: str
) -> None:
    """Raise UserError unless the sizes split into the quantum, the budget into every size, and fit the data;
    `where` and `budget` name the options that set the sizes and the budget."""
    if len(sizes) < 2 or sizes[0] < 1:
        raise UserError(f"{where} needs at least two positive global batches, e.g. 64,128,256")
    odd = [b for b in sizes if b % quantum]
    if odd:
        raise UserError(
            f"{where}: {', '.join(map(str, odd))} not a multiple of world × micro-batch = {quantum}; "
            f"use multiples of {quantum} (or another batch.micro_size)"
        )
    lcm = math.lcm(*sizes)
    if examples % lcm:
        raise UserError(
            f"the example budget {examples} is not a multiple of every size ({lcm}), so the branches would not see "
            f"the same examples; set {budget} to {max(lcm, examples // lcm * lcm)}"
        )
    if examples > train_examples:
        fits = train_examples // lcm * lcm
        fix = (
            f"set {budget} to at most {fits} (a multiple of {lcm}), or branch at smaller sizes than {where}"
            if fits
            else f"branch at smaller sizes than {where}, with {budget} at most {train_examples}"
        )
        raise UserError(
            f"the example budget {examples} exceeds the training set ({train_examples}); {fix}"
        )


def check(prepared: job.Job) -> None:
    """train.cbs_every's checks, before any process group: held-out data, sizes and budget."""
    train = prepared.cfg.train
    if not train.cbs_every or prepared.task is None:
        return
    if prepared.task.eval is None or len(prepared.task.eval) == 0:
        raise UserError(
            "train.cbs_every compares branches on the held-out loss: the task has no eval data; give it some "
            "(data.eval_fraction, or eval_data)"
        )
    if prepared.cfg.batch.micro_size == "auto":
        raise UserError(
            "train.cbs_every branches at the run's micro-batch: set batch.micro_size to a number"
        )
    sizes = run_sizes(prepared.cfg, prepared.plan)
    check_sizes(
        sizes,
        train.cbs_examples or default_examples(sizes),
        prepared.plan.world_size * prepared.plan.micro_batch,
        prepared.train_examples,
        f"train.cbs_sizes={sizes}",
        "train.cbs_examples",
    )


def run_sizes(cfg: config.Config, plan: batch.BatchPlan) -> list[int]:
    """train.cbs_sizes, else ⅛× to 4× the global batch in powers of two, those the quantum splits."""
    if cfg.train.cbs_sizes:
        return sorted(set(cfg.train.cbs_sizes))
    quantum = plan.world_size * plan.micro_batch
    sizes = {round(plan.global_batch * 2.0**k) for k in range(-3, 3)}
    return sorted(b for b in sizes if b >= quantum and b % quantum == 0)


def branch_config(cfg: config.Config, micro: int) -> config.Config:
    """The parent's config for a branch: a constant batch at the parent's micro-batch, no measurements inside."""
    out = copy.deepcopy(cfg)
    out.batch.schedule, out.batch.micro_size, out.batch.accum_steps = "constant", micro, None
    out.train.noise_scale, out.train.noise_every, out.train.cbs_every = False, None, 0
    out.train.nonfinite = (
        "skip"  # a branch past its stable LR diverges: its loss says so, the run goes on
    )
    out.run.resume = "never"
    return out


def measure(
    parent: job.Job,
    info: DistInfo,
    state: dict[str, Any],
    position: batch.Position,
    applied_samples: int,
    micro: int,
    sizes: list[int],
    examples: int,
    repeats: int,
    tolerance: float,
) -> Measurement:
    """Branch from `state` (the engine's state dict: parameters, optimizer, scaler) at `position`, after
    `applied_samples` examples of applied steps; every rank calls it (the branches are collective). `parent.model`
    gives the architecture (copied, never trained)."""
    from largebatch.trainer import Trainer, evaluate

    cfg = branch_config(parent.cfg, micro)
    branch_job = dataclasses.replace(parent, cfg=cfg, resume_from=None)

    def held_out(branch: Trainer) -> float:
        metrics = evaluate(branch.engine.module, parent.task, info, 2 * micro, cfg.data.workers)
        return metrics["loss"]

    start_loss, losses = None, []
    for repeat in range(repeats):
        start = position
        for _ in range(repeat):
            start = batch.advance(start, examples, parent.train_examples)
        row = []
        for size in sizes:
            branch = Trainer(
                dataclasses.replace(branch_job, model=copy.deepcopy(parent.model)), info
            )
            branch.engine.load_state_dict(copy.deepcopy(state), Path("<branch point>"))
            if start_loss is None:
                start_loss = held_out(branch)
            _run(branch, batch.plan(info.world_size, size, micro), start, applied_samples, examples)
            row.append(held_out(branch))
            del branch
        losses.append(row)
    return Measurement(sizes, examples, tolerance, start_loss, losses)


def _run(
    branch: Trainer, plan: batch.BatchPlan, position: batch.Position, applied: int, examples: int
) -> None:
    """Train `branch` for `examples` at `plan` from `position`, the LR schedule at `applied` examples."""
    branch.restart_at(plan, position, applied, branch.job.total_samples - examples)
    while branch.state.samples < branch.job.total_samples:
        branch.train_step()


def during_run(trainer: Trainer) -> None:
    """train.cbs_every: branch from this step in memory, append a line to cbs.jsonl (rank 0), and leave the run
    exactly as it was (its RNG state restored; its engine only read)."""
    cfg, s = trainer.cfg, trainer.state
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    sizes = run_sizes(cfg, trainer.job.plan)
    examples = cfg.train.cbs_examples or default_examples(sizes)
    result = measure(
        trainer.job,
        trainer.info,
        trainer.engine.state_dict(),
        s.position,
        s.applied_samples,
        trainer.plan.micro_batch,
        sizes,
        examples,
        1,
        TOLERANCE,
    )
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    if trainer.info.is_main:
        line = {
            "step": s.step,
            "samples": s.samples,
            "global_batch": trainer.plan.global_batch,
            **result.record(),
            "gns": s.noise.record().get("gns") if s.noise is not None else None,
        }
        path = cfg.run_dir / RECORD
        with trainer.flags.guard(str(path)), path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = noise_probe.checkpoint_parser(
        "cbs",
        __doc__,
        "checkpoint directory, or run directory (its latest good checkpoint, else model.pt with fresh "
        "optimizer moments)",
    )
    parser.add_argument(
        "--global-sizes", required=True, help="comma-separated global batches to branch at"
    )
    parser.add_argument(
        "--examples",
        type=int,
        help=f"examples each branch trains on (default: {EXAMPLES_PER_LARGEST} × the largest size)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help="fraction of the smallest batch's loss reduction a batch may lose and still count (default %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=REPEATS,
        help="branch points, each --examples further on in the data (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_intermixed_args(argv)  # section.key=value before or after the options
    try:
        sizes = [int(b) for b in args.global_sizes.split(",")]
    except ValueError:
        raise UserError(
            f"--global-sizes={args.global_sizes} must be comma-separated integers, e.g. 64,128,256"
        ) from None
    result = critical_batch(
        args.config,
        args.checkpoint,
        sizes,
        overrides=args.overrides,
        examples=args.examples,
        tolerance=args.tolerance,
        repeats=args.repeats,
    )
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def critical_batch(
    config_or_path: str | Path | dict[str, Any] | None,
    checkpoint: str | Path,
    global_sizes: list[int],
    *,
    overrides: list[str] | tuple[str, ...] = (),
    examples: int | None = None,
    tolerance: float = TOLERANCE,
    repeats: int = REPEATS,
) -> dict[str, Any]:
    """The branched critical batch at `checkpoint` of a run trained with `config_or_path` (+ `overrides`), on this
    process: each size's eval loss after `examples` (default 8 × the largest size) per repeat, the critical batch
    and its interval, and the run's global batch and noise scale (`largebatch cbs --json` writes this dict).
    Raises UserError on what cannot be measured."""
    if not 0 < tolerance < 1:
        raise UserError(f"--tolerance={tolerance} must be between 0 and 1 (a fraction of progress)")
    if repeats < 1:
        raise UserError(f"--repeats={repeats} must be at least 1")
    sizes = sorted(set(global_sizes))
    source, state, manifest = noise_probe.state_of(Path(checkpoint))
    cfg = config.load(config_or_path, list(overrides))
    saved = manifest.get("meta", {})
    if saved.get("engine.name", "ddp") != "ddp":
        raise UserError(
            f"checkpoint {source} was written by engine.name={saved['engine.name']}, whose optimizer state "
            f"loads only in its own process group; give a checkpoint of an engine.name=ddp run"
        )
    micro = cfg.batch.micro_size if isinstance(cfg.batch.micro_size, int) else sizes[0]
    cfg.batch.micro_size = cfg.batch.accum_steps = None  # one process branches: its own plans
    cfg.engine.name, cfg.run.resume, cfg.train.noise_scale = "ddp", "never", False
    cfg.train.noise_every, cfg.train.cbs_every = None, 0
    prepared = job.prepare(cfg, 1)
    noise_probe.check_trained_with(source, saved, prepared)
    if prepared.task.eval is None or len(prepared.task.eval) == 0:
        raise UserError(
            "cbs compares branches on the held-out loss: the task has no eval data; give it some "
            "(data.eval_fraction)"
        )
    examples = examples or default_examples(sizes)
    check_sizes(
        sizes,
        examples,
        micro,
        prepared.train_examples,
        f"--global-sizes={','.join(map(str, sizes))}",
        "--examples",
    )
    noise_probe.load_weights(prepared.model, state["model"], source, cfg)
    fresh = "optimizer" not in state
    torch.set_num_threads(prepared.threads)
    info = DistInfo(0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    measured = measure(
        prepared,
        info,
        _engine_state(prepared, info, state, fresh),
        tuple(state.get("position", (0, 0))),
        state.get("applied_samples", 0),
        micro,
        sizes,
        examples,
        repeats,
        tolerance,
    )
    return {
        "checkpoint": str(source),
        "step": manifest.get("step"),
        "fresh_optimizer": fresh,
        **measured.record(),
        "global_batch": prepared.plan.global_batch,
        "gns": _noise_of(state),
    }


def _engine_state(
    prepared: job.Job, info: DistInfo, state: dict[str, Any], fresh: bool
) -> dict[str, Any]:
    """The engine state a branch loads: the checkpoint's, or (model.pt) its weights with a fresh optimizer."""
    if not fresh:
        return state
    from largebatch.trainer import build_state

    return build_state(prepared, info).engine.state_dict()


def _noise_of(state: dict[str, Any]) -> float | None:
    """The run's smoothed noise scale at the checkpoint, if it measured one (train.noise_scale)."""
    if not state.get("noise"):
        return None
    measured = NoiseScale()
    measured.load_state_dict(state["noise"])
    return measured.value


def report(result: dict[str, Any]) -> None:
    """The human-readable lines of `critical_batch`'s result: each branch's loss, the critical batch and its
    interval, where the run's batch and noise scale stand."""
    step = result["step"]
    where = f"step {step}" if step is not None else "final weights"
    print(
        f"branched critical batch at {result['checkpoint']} ({where}): {result['examples']} examples per branch, "
        f"{len(result['losses'])} repeat(s); {KEEPS}"
        + ("; optimizer moments fresh (model.pt has none)" if result["fresh_optimizer"] else "")
    )
    start, mean = result["start_loss"], result["mean_losses"]
    print(f"held-out loss at the branch point L_0 = {start:.6g}")
    print(f"{'batch':>8} {'loss after N':>13} {'progress':>9}  per repeat")
    for i, (size, loss) in enumerate(zip(result["sizes"], mean)):
        share = (start - loss) / (start - mean[0]) if start > mean[0] else math.nan
        per = " ".join(f"{row[i]:.5g}" for row in result["losses"])
        print(f"{size:>8} {loss:>13.6g} {share:>9.1%}  {per}")
    critical = result["critical_batch"]
    if critical is None:
        print(
            "no critical batch: the smallest batch made no progress in N examples; raise --examples or the LR"
        )
        return
    low, high = result["interval"]
    upper = f"{high}" if high is not None else f"> {result['sizes'][-1]} (untested)"
    print(
        f"critical batch = {critical}: the largest whose progress is at least {1 - result['tolerance']:.0%} of "
        f"the smallest batch's (--tolerance {result['tolerance']:g}); interval [{low}, {upper}] over repeats"
    )
    batch = result["global_batch"]
    print(f"run's global batch {batch} = {batch / critical:.3g} × the critical batch")
    if result["gns"] is None:
        print(
            "noise scale: the checkpoint has none (train with train.noise_scale=true, or run largebatch noise-scale)"
        )
    else:
        print(
            f"noise scale B_noise = {result['gns']:.4g} = {result['gns'] / critical:.3g} × the critical batch"
        )
