"""Trainer overhead: samples/s of `trainer.fit` vs a minimal hand-written DDP loop, same model, data and batch.

Both run in the same torchrun job, alternating, so they see the same machine state; the ratio of
medians is printed (goal ≥ 0.98). Throughput counts the training loop only, not the final eval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIG = (
    "data.name=synthetic", "data.size=32768", "data.shape=[256]", "model.name=mlp", "model.width=1024",
    "model.depth=2", "batch.global_size=512", "batch.micro_size=128", "optim.name=sgd", "optim.lr=0.1",
    "logging.progress=false", "train.log_every=10",
)


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
            idx = order[first + m * plan.micro_batch:first + (m + 1) * plan.micro_batch]
            if info.world_size > 1:
                ddp.require_backward_grad_sync = m == plan.accum_steps - 1
            loss = F.cross_entropy(ddp(x_all[idx]), y_all[idx]) / plan.accum_steps
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % job.cfg.train.log_every == 0:
            all_reduce_sum(loss.detach().clone()).item()
    return job.total_steps * plan.global_batch / (time.perf_counter() - start)


def worker(steps: int, repeats: int) -> None:
    """Runs under torchrun: alternate both loops `repeats` times; rank 0 prints one JSON line."""
    from largebatch import config, dist, job, trainer

    info = dist.from_env()
    dist.init(info)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(None, [*CONFIG, f"train.steps={steps}", f"run.dir={tmp}"])
        prepared = job.prepare(cfg, info.world_size)
        handwritten(prepared, info)  # warm-up: allocator, thread pools, gloo buffers
        for _ in range(repeats):
            theirs.append(handwritten(prepared, info))
            ours.append(trainer.fit(prepared, info)["samples_per_s"])
    dist.teardown()
    if info.is_main:
        print(json.dumps({"ours": ours, "handwritten": theirs, "plan": prepared.plan.describe()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="largebatch bench loop", description=__doc__)
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=9, help="alternating measurements of each loop")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "largebatch.bench.loop", "--worker", str(args.steps), str(args.repeats)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        print(result.stdout[-2000:] + result.stderr[-2000:], file=sys.stderr)
        return 1
    res = json.loads(lines[-1])
    ours, theirs = statistics.median(res["ours"]), statistics.median(res["handwritten"])
    print(f"{res['plan']}, {args.nproc} processes, {args.steps} steps × {args.repeats} repeats (median)")
    print(f"{'hand-written DDP loop':24} {theirs:10.0f} samples/s")
    print(f"{'largebatch trainer':24} {ours:10.0f} samples/s")
    print(f"ratio trainer / hand-written = {ours / theirs:.3f} (goal ≥ 0.98)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
