"""Gradient noise scale overhead: samples/s of `trainer.fit` measuring it on every step vs not measuring it.

Both sides log every step (`train.log_every=1`), so only the measurement differs: with 2+ processes the DDP
engine's communication hook takes each gradient bucket's local squared norm before DDP's all-reduce (which it
does unchanged, still overlapped with backward), and the rank mean rides in the step's one all-reduce. The
variants alternate in one torchrun job, as in `bench loop`; the ratio of medians is printed (goal ≥ 0.98).
`--engine fsdp` runs both variants on FSDP2 instead, which measures in its reduce-scatter. Every trainer run trains a
fresh copy of the built model (FSDP2 shards a module once).
`--hook` runs a hand-written loop on the DDP engine three ways instead (no measurement; all-reducing by hand after
an unsynced backward, as the trainer did before it measured in the hook; the communication hook) and times the
pieces of the step that differ.
"""

import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

from largebatch import bench, config
from largebatch.bench import loop

VARIANTS = {
    "off": ("noise scale off", "train.noise_scale=false"),
    "on": ("noise scale every step", "train.noise_scale=true"),
}
"""The trainer's variants, baseline first: name → (label, override)."""
LOOPS = {"none": "no measurement", "after": "sync after backward", "hook": "comm hook"}
"""--hook: the hand-written loop's ways to measure the local squared norm, baseline first."""
ENGINES = ("ddp", "fsdp")
"""--engine: the engines whose trainer the variants compare on."""
PIECES = ("backward", "local_sq", "rank_mean", "all_reduce")
"""The timed parts of the step's last micro-step and sync, in ms (`backward` includes DDP's overlapped all-reduce)."""


def sq_norm_hook() -> Callable:
    """A DDP communication hook whose state is a list: it appends each bucket's local squared gradient norm, then
    runs DDP's default all-reduce (mean over ranks) on the bucket; k-diffusion's `DDPGradientStatsHook`, small-batch
    half. Built here so that only the workers import torch; DDP compares the hook's annotations with torch objects,
    hence no `from __future__ import annotations` in this module."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(
        norms: list[torch.Tensor], bucket: dist.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        norms.append(torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).square())
        return allreduce_hook(None, bucket)

    return hook


def handwritten(job, info, how: str) -> tuple[float, dict[str, list[float]], float]:
    """Index the tensors and step the trainer's DDP engine, measuring the local squared norm `how` on every step.
    Returns samples/s, ms per step of each piece, and the first step's rank-mean local squared norm."""
    import torch
    import torch.distributed as dist

    from largebatch import optim
    from largebatch.dist import all_reduce_sum
    from largebatch.engine.ddp import DDPEngine

    torch.manual_seed(job.cfg.run.seed)
    engine = DDPEngine(
        job.task.build_model(),
        lambda module: optim.build(module, job.cfg.optim, job.peak_lr),
        job.cfg,
        job.plan,
        info,
    )
    norms: list[torch.Tensor] = []
    if how == "hook":
        engine.model.register_comm_hook(norms, sq_norm_hook())
    x_all, y_all = job.task.train.inputs, job.task.train.labels
    plan, n = job.plan, len(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ms: dict[str, list[float]] = defaultdict(list)
    first_sq = 0.0
    start = time.perf_counter()
    for step in range(job.total_steps):
        first = (step * plan.global_batch + info.rank * plan.per_rank) % (n - plan.global_batch)
        loss_sum = torch.zeros((), device=info.device)
        for m in range(plan.accum_steps):
            last = m == plan.accum_steps - 1
            idx = order[first + m * plan.micro_batch : first + (m + 1) * plan.micro_batch]
            with engine.micro_step(last and how != "after"):
                total, _, _ = job.task.score(engine.model, x_all[idx], y_all[idx])
                t0 = time.perf_counter()
                engine.backward(total / plan.per_rank)
            loss_sum += total.detach()
        t1 = time.perf_counter()
        ms["backward"].append(1e3 * (t1 - t0))
        extra = [torch.stack(norms).sum()] if how == "hook" else []
        norms.clear()
        if how == "after":
            sq = engine.local_grad_sq()
            t2 = time.perf_counter()
            sq = all_reduce_sum(torch.tensor(sq, dtype=torch.float64)).item() / info.world_size
            t3 = time.perf_counter()
            engine.reduce_gradients()
            ms["local_sq"].append(1e3 * (t2 - t1))
            ms["rank_mean"].append(1e3 * (t3 - t2))
            ms["all_reduce"].append(1e3 * (time.perf_counter() - t3))
        summed = torch.cat([loss_sum.view(1), *(t.view(1) for t in extra)]).double()
        dist.all_reduce(summed)  # the trainer's one agreement per step; the hook's norm rides in it
        if how == "hook":
            sq = summed[1].item() / info.world_size
        if step == 0 and how != "none":
            first_sq = sq
        engine.step(summed[0].item(), None, 0.0)  # DDP: its step takes the norm itself
    return job.total_steps * plan.global_batch / (time.perf_counter() - start), ms, first_sq


def load(path: str | None, overrides: list[str], extra: tuple[str, ...]) -> config.Config:
    """The config file with `overrides`, or `bench loop`'s MLP job without one; every step logged, steps not epochs."""
    base = [] if path else list(loop.CONFIG)
    return config.load(path, [*base, "train.log_every=1", "train.epochs=null", *overrides, *extra])


def worker(hook: bool, steps: int, repeats: int, path: str | None, overrides: list[str]) -> None:
    """Runs under torchrun: alternate the variants (or, with `hook`, the hand-written loops) `repeats` times; rank 0
    prints one JSON line."""
    from largebatch import dist, job

    info = dist.from_env()
    dist.init(info)
    names = list(LOOPS) if hook else list(VARIANTS)
    samples_per_s: dict[str, list[float]] = {name: [] for name in names}
    pieces: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in names}
    first_sq: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {
            name: job.prepare(
                load(
                    path,
                    overrides,
                    (
                        "train.noise_scale=false" if hook else VARIANTS[name][1],
                        f"train.steps={steps}",
                        f"run.dir={tmp}/{name}",
                    ),
                ),
                info.world_size,
            )
            for name in names
        }
        built = {name: copy.deepcopy(prepared.model) for name, prepared in jobs.items()}

        def fresh(name: str) -> "job.Job":
            """The job with an untouched copy of its built model: each run starts from the same weights."""
            return dataclasses.replace(jobs[name], model=copy.deepcopy(built[name]))

        run = (
            (lambda name: handwritten(jobs[name], info, name))
            if hook
            else (lambda name: (loop.measure(fresh(name), info, False), {}, 0.0))
        )
        run(names[-1])  # warm-up: allocator, thread pools, gloo buffers
        for _ in range(repeats):
            for name in names:
                rate, ms, first_sq[name] = run(name)
                samples_per_s[name].append(rate)
                for piece, values in ms.items():
                    pieces[name][piece] += values
    dist.teardown()
    if info.is_main:
        print(
            json.dumps(
                {
                    "samples_per_s": samples_per_s,
                    "plan": jobs[names[0]].plan.describe(),
                    "engine": jobs[names[0]].cfg.engine.name,
                    "ms": {
                        name: {p: statistics.median(v) for p, v in ms.items()}
                        for name, ms in pieces.items()
                    },
                    "first_sq": first_sq,
                }
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser("gns", __doc__)
    parser.add_argument("--config", help="YAML config (default: bench loop's MLP job)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument(
        "--repeats", type=int, default=9, help="alternating measurements of each variant"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="ddp",
        help="the engine both variants train on (default ddp; fsdp: FSDP2, measuring in its reduce-scatter); "
        "same as the override engine.name=fsdp (or ddp)",
    )
    parser.add_argument(
        "--hook",
        action="store_true",
        help="a hand-written loop: no measurement, sync after backward, and a DDP communication hook",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    if args.hook and args.nproc < 2:
        parser.error(f"--hook needs DDP: --nproc={args.nproc}; use --nproc 2 or more")
    if args.hook and args.engine != "ddp":
        parser.error(f"--hook times the DDP engine's loop: drop --engine {args.engine} or --hook")
    res = bench.run_workers(
        "largebatch.bench.gns",
        args.nproc,
        str(int(args.hook)),
        str(args.steps),
        str(args.repeats),
        args.config or "",
        f"engine.name={args.engine}",
        *args.overrides,
    )
    if res is None:
        return 1
    labels = dict(LOOPS) if args.hook else {name: label for name, (label, _) in VARIANTS.items()}
    median = {name: statistics.median(values) for name, values in res["samples_per_s"].items()}
    print(
        f"{res['plan']}, engine {res['engine']}, {args.nproc} processes, every step measured and logged, "
        f"{args.steps} steps × {args.repeats} repeats (median)"
    )
    if args.hook:
        print(
            f"{'':24} {'samples/s':>10} "
            + " ".join(f"{p:>10}" for p in PIECES)
            + "   (ms per step)"
        )
    for name, label in labels.items():
        ms = res["ms"][name]
        print(
            f"{label:24} {median[name]:10.0f}"
            + "".join(f" {ms[p]:10.2f}" for p in PIECES if p in ms)
        )
    print(
        "runs (samples/s): "
        + "; ".join(
            f"{name} " + " ".join(f"{v:.0f}" for v in values)
            for name, values in res["samples_per_s"].items()
        )
    )
    base, *others = labels
    for name in others:
        print(f"ratio {name} / {base} = {median[name] / median[base]:.3f} (goal ≥ 0.98)")
    if args.hook:
        sq = res["first_sq"]
        print(
            f"first step's local squared gradient norm: after backward {sq['after']:.6g}, hook {sq['hook']:.6g}"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(
            sys.argv[2] == "1",
            int(sys.argv[3]),
            int(sys.argv[4]),
            sys.argv[5] or None,
            sys.argv[6:],
        )
    else:
        sys.exit(main())
