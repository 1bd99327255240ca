"""`largebatch bench NAME [options]`: benchmarks that print ratios against a baseline, not timed tests."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from typing import Any

from largebatch.errors import check_choice

BENCHMARKS = {
    "data": "our image-folder loader against torchvision's ImageFolder + DataLoader, and whether "
    "training is input-bound",
    "gns": "samples/s of the trainer measuring the gradient noise scale on every step vs not; --hook: a hand-written "
    "DDP loop measuring it the trainer's way (sync after backward) and in a communication hook",
    "loop": "our trainer's samples/s against a minimal hand-written DDP loop; --engine deepspeed: ZeRO-0/2 vs DDP",
    "memory": "activation memory and step time with and without gradient checkpointing (tiny GPT, CNN); --engines: "
    "per-rank bytes of parameters, gradients and optimizer state under DDP, ZeRO 0-3 and FSDP",
    "optim": "our LARS/LAMB against torch's fused SGD/AdamW and torch-optimizer, on ResNet-50's shapes; --sharded: "
    "on FSDP2-style shards of 2 processes (one all-reduce for whole-parameter norms)",
}


def run(name: str, argv: list[str]) -> int:
    check_choice("bench", name, list(BENCHMARKS))
    return importlib.import_module(f"largebatch.bench.{name}").main(argv)


def run_workers(module: str, nproc: int, *args: str) -> dict[str, Any] | None:
    """`python -m MODULE --worker ARGS` under torchrun with `nproc` processes: rank 0's last JSON line, or None
    (the output goes to stderr) if the job failed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        module,
        "--worker",
        *args,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        print(result.stdout[-2000:] + result.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(lines[-1])
