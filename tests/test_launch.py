"""The launch scripts start the same job: torchrun.sh and deepspeed.sh match a plain torchrun run bit for bit."""

from __future__ import annotations

import json
import os
import socket
import subprocess

from conftest import ROOT, train

TINY = (
    "data.size=512",
    "data.shape=[16]",
    "model.width=32",
    "batch.global_size=32",
    "train.steps=10",
    "logging.progress=false",
    "run.threads=1",
)
"""Threads pinned: float results may depend on the thread count, which each launcher would otherwise pick by the rule
(torchrun alone: 1 for 2+ processes; the scripts: OMP_NUM_THREADS or cores ÷ processes)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, run_dir, **env) -> dict:
    empty = run_dir.parent / "defaults.yaml"
    empty.write_text("{}\n")
    command = [f"launch/{script}", str(empty), *TINY, f"run.dir={run_dir}"]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NPROC": "2", "MASTER_PORT": str(_free_port()), **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return json.loads((run_dir / "summary.json").read_text())


def test_torchrun_and_deepspeed_launchers_give_the_same_run(run_dirs):
    reference = train(run_dirs("torchrun"), *TINY, nproc=2)
    via_script = _launch("torchrun.sh", run_dirs("torchrun_sh"))
    via_deepspeed = _launch("deepspeed.sh", run_dirs("deepspeed_sh"))
    assert via_script["world_size"] == via_deepspeed["world_size"] == 2
    assert (
        via_script["params_sha256"] == via_deepspeed["params_sha256"] == reference["params_sha256"]
    )


def test_a_config_mistake_is_one_line_before_any_process_starts(run_dirs):
    for script in ("torchrun.sh", "deepspeed.sh"):
        result = subprocess.run(
            [f"launch/{script}", "configs/quickstart.yaml", "batch.global_size=511"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "NPROC": "2"},
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "largebatch: error: batch.global_size=511 is not divisible by world_size=2; use a multiple of 2"
        ]
