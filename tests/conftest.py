"""Shared helpers: run the real CLI, alone or under real torchrun (gloo, loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every test process runs one thread per process, whatever the caller exported: results (which can change with the
# thread count) then do not depend on the caller or the core count, and a loaded machine is not oversubscribed
# (2 threads per process beside CPU hogs made single steps up to 40x slower in OpenMP barriers). Set before torch
# is imported, so it holds in this process too. tests/test_threads.py checks the rule itself.
os.environ["OMP_NUM_THREADS"] = "1"


def cli(*args: str, nproc: int = 1, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m largebatch ARGS`, or the same under torchrun with `nproc` processes on 127.0.0.1."""
    launcher = [sys.executable, "-m", "largebatch"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "largebatch"]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([*launcher, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


def train(run_dir: Path, *overrides: str, nproc: int = 1, config: str | None = None) -> dict:
    """Train to completion and return summary.json; fails the test with the output if the run fails."""
    args = ["train", *(["--config", config] if config else []), f"run.dir={run_dir}", "logging.progress=false", *overrides]
    result = cli(*args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_dirs(tmp_path: Path):
    """A fresh run directory per name."""
    return lambda name: tmp_path / name
