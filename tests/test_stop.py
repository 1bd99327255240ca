"""Stopping together: SIGTERM/SIGINT stop every rank at a step boundary with a checkpoint; a rank-0 write failure
ends every rank within seconds; stale temporary checkpoint directories are cleaned up."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import torch
from conftest import ROOT, metrics, torchrun, train_in_one_job

from largebatch import checkpoint

SLOW = (
    "data.size=4096",
    "data.shape=[64]",
    "model.width=256",
    "batch.global_size=64",
    "optim.lr=0.05",
    "optim.scaling=none",
    "train.steps=150",
    "train.log_every=1",
    "run.threads=1",
    "logging.progress=false",
)


def _start(run, *overrides: str, nproc: int = 1) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "largebatch"]
    if nproc > 1:
        launcher = [
            *torchrun(nproc),
            "-m",
            "largebatch",
        ]
    return subprocess.Popen(
        [*launcher, "train", f"run.dir={run}", *overrides],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _signal_after(process: subprocess.Popen, run, steps: int, signum: int) -> tuple[str, str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        log = run / "metrics.jsonl"
        if log.exists() and log.read_text().count("\n") >= steps:
            process.send_signal(signum)
            break
        time.sleep(0.02)
    return process.communicate(timeout=120)


def test_sigterm_to_torchrun_stops_every_rank_at_a_step_with_a_checkpoint_and_the_rerun_continues_exactly(
    run_dirs,
):
    run = run_dirs("preempted")
    agent = _start(run, *SLOW, nproc=2)
    _, err = _signal_after(agent, run, 20, signal.SIGTERM)
    assert agent.returncode != 0
    assert err.count("largebatch: stopped: SIGTERM after step") == 1, err[-3000:]
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and 20 <= int(saved[0].name.removeprefix("step_")) < 150
    assert not (run / "summary.json").exists()
    # The rerun and the uninterrupted reference, one after the other in one 2-process torchrun job.
    train_in_one_job(run.parent, {"preempted": SLOW, "uninterrupted": SLOW})
    resumed, reference = (
        json.loads((run_dirs(name) / "summary.json").read_text())
        for name in ("preempted", "uninterrupted")
    )
    assert resumed["params_sha256"] == reference["params_sha256"]
    assert [r["step"] for r in metrics(run)] == list(range(1, 151))


def test_sigint_on_one_process_saves_a_checkpoint_and_exits_130_with_one_line(run_dirs):
    run = run_dirs("interrupted")
    process = _start(run, *SLOW)
    _, err = _signal_after(process, run, 10, signal.SIGINT)
    assert process.returncode == 130
    assert err.strip().splitlines() == [err.strip()] and err.startswith(
        "largebatch: stopped: SIGINT after step"
    )
    step = int(err.split("after step ")[1].split(";")[0])
    assert (run / f"checkpoints/step_{step:08d}").is_dir()


def test_an_unwritable_checkpoint_directory_ends_every_rank_within_seconds_with_one_line(run_dirs):
    run = run_dirs("full_disk")
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoint directory should be\n")
    started = time.monotonic()
    process = _start(run, *SLOW, "train.checkpoint_every=5", nproc=2)
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert process.returncode != 0
    lines = [line for line in (out + err).splitlines() if line.startswith("largebatch:")]
    assert len(lines) == 1 and lines[0].startswith(
        "largebatch: stopped: cannot write a checkpoint under"
    ), out + err
    assert [r["step"] for r in metrics(run)][
        -1
    ] == 5  # the failed save at step 5 stops everyone before step 6 ends


def test_a_temporary_directory_left_by_a_killed_writer_is_removed_on_the_next_save(tmp_path):
    stale = tmp_path / "checkpoints" / ".step_00000010.abc123"
    stale.mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"half written")
    checkpoint.save(tmp_path, 20, {"x": torch.zeros(1)}, {}, keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000020"]
