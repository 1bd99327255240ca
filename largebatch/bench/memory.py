"""Gradient checkpointing's trade: activation memory saved for backward vs step time, on the tiny GPT and the CNN.

Activation memory is the bytes autograd holds for backward at the end of the forward pass (counted with
`saved_tensors_hooks`; with checkpointing, backward transiently recomputes one block's activations on top).
Step time is the median of forward + backward + optimizer step. Goal: ≤ 0.5× the memory at ≤ 1.4× the time.
"""

from __future__ import annotations

import statistics
import time

import torch

from largebatch import config, task as tasks
from largebatch.errors import ArgumentParser
from largebatch.memory import ActivationMeter

WORKLOADS = {
    "gpt": ("data.name=text", "data.context=128", "model.name=gpt", "model.width=128", "model.depth=4", "model.heads=4"),
    "resnet": ("data.name=synthetic", "data.size=256", "data.shape=[3,32,32]", "model.name=resnet", "model.norm=group",
               "model.width=32", "model.depth=2"),
}


def measure(overrides: tuple[str, ...], micro: int, checkpointing: bool, steps: int) -> tuple[int, float]:
    """(activation bytes, median seconds per step)."""
    cfg = config.load(None, [*overrides, f"model.grad_checkpointing={str(checkpointing).lower()}"])
    task = tasks.build(cfg)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = tasks.take(task.train, range(micro))
    meter = ActivationMeter()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with meter.track(model):
            total, count = task.loss(tasks.forward(model, x), y)
            loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return meter.bytes, statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="largebatch bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--micro", type=int, default=32, help="micro-batch size")
    args = parser.parse_args(argv)
    print(f"micro-batch {args.micro}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(f"{'model':8} {'activations':>14} {'with ckpt':>12} {'ratio':>7} {'step ms':>9} {'with ckpt':>10} {'ratio':>7}")
    for name, overrides in WORKLOADS.items():
        plain_bytes, plain_s = measure(overrides, args.micro, False, args.steps)
        ckpt_bytes, ckpt_s = measure(overrides, args.micro, True, args.steps)
        print(f"{name:8} {plain_bytes / 2**20:>10.1f} MiB {ckpt_bytes / 2**20:>8.1f} MiB {ckpt_bytes / plain_bytes:>7.2f} "
              f"{plain_s * 1e3:>9.1f} {ckpt_s * 1e3:>10.1f} {ckpt_s / plain_s:>7.2f}")
    print("goal: activations ≤ 0.5× at step time ≤ 1.4×")
    return 0
