"""`largebatch bench NAME [options]`: benchmarks that print ratios against a baseline, not timed tests."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from typing import Any

from largebatch.errors import ArgumentParser, UserError, check_choice

BENCHMARKS = {
    "comm": "all-reduce time vs size on gloo: the fitted latency and bandwidth (--out FIT.json for plan --gpus)",
    "data": "our image-folder loader vs torchvision's ImageFolder + DataLoader; is training input-bound",
    "gns": "the trainer's samples/s measuring the gradient noise scale every step vs not",
    "loop": "our trainer's samples/s vs a minimal hand-written DDP or FSDP2 loop, or a nanoGPT-style loop on a GPT "
    "(or DeepSpeed ZeRO vs DDP)",
    "memory": "activation memory and step time with and without gradient checkpointing; bytes per engine",
    "optim": "our LARS/LAMB step vs torch's fused SGD/AdamW and torch-optimizer, on ResNet-50's shapes; "
    "--muon: our Muon vs torch.optim.Muon on GPT matrices",
    "start": "seconds from `largebatch train` to its first finished step vs `python -c 'import torch'`",
}
"""Name → one line for `largebatch bench --help`; each benchmark's own --help (its module's docstring) says more."""


def listing() -> str:
    """The benchmarks, one per line with its description, for `largebatch bench --help`."""
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"  {name:{width}}  {line}" for name, line in BENCHMARKS.items())


def parser(name: str, doc: str) -> ArgumentParser:
    """The argument parser of `largebatch bench NAME`, its help the benchmark module's docstring `doc`."""
    return ArgumentParser(
        prog=f"largebatch bench {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def cuda_devices() -> int:
    """The CUDA devices torch sees, for a benchmark's `--device cuda`; a one-line error where there is none."""
    import torch  # here: `largebatch bench --help` does without it

    if not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here; run it on a GPU machine")
    return torch.cuda.device_count()


def run(name: str, argv: list[str]) -> int:
    check_choice("bench", name, list(BENCHMARKS))
    return importlib.import_module(f"largebatch.bench.{name}").main(argv)


def run_workers(
    module: str, nproc: int, *args: str, cpu_only: bool = False
) -> dict[str, Any] | None:
    """`python -m MODULE --worker ARGS` under torchrun with `nproc` processes: rank 0's last JSON line, or None
    (the output goes to stderr) if the job failed. `cpu_only`: the workers see no GPU (a CPU comparison on a GPU
    machine)."""
    # imported here: largebatch.dist imports torch, which `largebatch bench --help` does without
    from largebatch.dist import torchrun_command

    command = [*torchrun_command(nproc), "-m", module, "--worker", *args]
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if cpu_only else {}
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **hidden},
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        print(result.stdout[-2000:] + result.stderr[-6000:], file=sys.stderr)  # a traceback whole
        return None
    return json.loads(lines[-1])
