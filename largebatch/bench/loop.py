"""Trainer overhead: samples/s of `trainer.fit` vs a minimal hand-written DDP loop, same model, data and batch.

Both run in the same torchrun job, alternating, so they see the same machine state; the ratio of
medians is printed (goal ≥ 0.98). Throughput counts the training loop only, not the final eval.
`--engine deepspeed` alternates the trainer on engine ddp, DeepSpeed ZeRO-0 and ZeRO-2 instead, and prints
each ZeRO stage's ratio to DDP.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

from largebatch import bench

CONFIG = (
    "data.name=synthetic",
    "data.size=32768",
    "data.shape=[256]",
    "model.name=mlp",
    "model.width=1024",
    "model.depth=2",
    "batch.global_size=512",
    "batch.micro_size=128",
    "optim.name=sgd",
    "optim.lr=0.1",
    "logging.progress=false",
    "train.log_every=10",
)
DEEPSPEED = ("engine.name=deepspeed",)
LOOPS = {
    "ddp": {"hand-written": ("hand-written DDP loop", None), "trainer": ("largebatch trainer", ())},
    "deepspeed": {
        "DDP": ("trainer, engine ddp", ()),
        "ZeRO-0": ("trainer, ZeRO-0", (*DEEPSPEED, "engine.zero_stage=0")),
        "ZeRO-2": ("trainer, ZeRO-2", (*DEEPSPEED, "engine.zero_stage=2")),
    },
}
"""--engine → the loops compared, baseline first: name → (label, overrides of CONFIG; None: the hand-written loop)."""


def handwritten(job, info) -> float:
    """nanoGPT-style: index the tensors, skip the all-reduce on all but the last micro-step, step. Returns samples/s."""
    import torch
    import torch.nn.functional as F

    from largebatch.dist import all_reduce_sum

    torch.manual_seed(job.cfg.run.seed)
    model = job.task.build_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.world_size > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=job.peak_lr, momentum=0.9, foreach=True)
    x_all, y_all = job.task.train.inputs, job.task.train.labels
    plan, n = job.plan, len(y_all)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for step in range(job.total_steps):
        first = (step * plan.global_batch + info.rank * plan.per_rank) % (n - plan.global_batch)
        for m in range(plan.accum_steps):
            idx = order[first + m * plan.micro_batch : first + (m + 1) * plan.micro_batch]
            if info.world_size > 1:
                ddp.require_backward_grad_sync = m == plan.accum_steps - 1
            loss = F.cross_entropy(ddp(x_all[idx]), y_all[idx]) / plan.accum_steps
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % job.cfg.train.log_every == 0:
            all_reduce_sum(loss.detach().clone()).item()
    return job.total_steps * plan.global_batch / (time.perf_counter() - start)


def measure(job, info, hand_written: bool) -> float:
    """Samples/s of one run of the hand-written loop or of `trainer.fit`."""
    from largebatch import trainer

    return handwritten(job, info) if hand_written else trainer.fit(job, info)["samples_per_s"]


def worker(engine: str, steps: int, repeats: int) -> None:
    """Runs under torchrun: alternate the loops of `engine` `repeats` times; rank 0 prints one JSON line."""
    from largebatch import config, dist, job

    info = dist.from_env()
    dist.init(info, always=engine == "deepspeed")
    loops = LOOPS[engine]
    samples_per_s: dict[str, list[float]] = {name: [] for name in loops}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {
            name: job.prepare(
                config.load(
                    None,
                    [*CONFIG, *(overrides or ()), f"train.steps={steps}", f"run.dir={tmp}/{name}"],
                ),
                info.world_size,
            )
            for name, (_, overrides) in loops.items()
        }
        first = next(iter(loops))
        measure(
            jobs[first], info, loops[first][1] is None
        )  # warm-up: allocator, thread pools, gloo buffers
        for _ in range(repeats):
            for name, (_, overrides) in loops.items():
                samples_per_s[name].append(measure(jobs[name], info, overrides is None))
    dist.teardown()
    if info.is_main:
        print(json.dumps({"samples_per_s": samples_per_s, "plan": jobs[first].plan.describe()}))


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser("loop", __doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument(
        "--repeats", type=int, default=9, help="alternating measurements of each loop"
    )
    parser.add_argument(
        "--engine",
        choices=list(LOOPS),
        default="ddp",
        help="ddp: the trainer against a hand-written loop; deepspeed: ZeRO-0 and ZeRO-2 against DDP",
    )
    args = parser.parse_args(argv)
    res = bench.run_workers(
        "largebatch.bench.loop", args.nproc, args.engine, str(args.steps), str(args.repeats)
    )
    if res is None:
        return 1
    loops = LOOPS[args.engine]
    median = {name: statistics.median(values) for name, values in res["samples_per_s"].items()}
    print(
        f"{res['plan']}, {args.nproc} processes, {args.steps} steps × {args.repeats} repeats (median)"
    )
    for name, (label, _) in loops.items():
        print(f"{label:24} {median[name]:10.0f} samples/s")
    base, *others = loops
    goal = " (goal ≥ 0.98)" if args.engine == "ddp" else ""
    for name in others:
        print(f"ratio {name} / {base} = {median[name] / median[base]:.3f}{goal}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
