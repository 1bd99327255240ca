"""Checkpoints: atomic and verified, exact resume, elastic resume, kill -9 under torchrun, non-finite steps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import (
    cli,
    cli_in_one_process,
    cli_in_process,
    kill_one_worker_mid_run,
    metrics,
    train_in_one_job,
)

SMALL = (
    "data.size=1024",
    "data.shape=[16]",
    "model.width=32",
    "batch.global_size=32",
    "optim.name=adamw",
    "optim.lr=0.01",
    "optim.scaling=none",
    "schedule.name=cosine",
    "schedule.warmup_steps=3",
    "train.steps=30",
    "train.log_every=1",
    "train.checkpoint_every=10",
)


KILLED = (
    "data.size=4096",
    "data.shape=[64]",
    "model.width=256",
    "batch.global_size=64",
    "optim.lr=0.05",
    "optim.scaling=none",
    "train.steps=120",
    "train.log_every=1",
    "train.checkpoint_every=20",
)
"""The kill -9 run: 2 processes, steps slow enough that the kill lands mid-run."""
DIVERGE = (
    "data.size=512",
    "model.width=32",
    "optim.lr=1e20",
    "optim.scaling=none",
    "train.steps=20",
)


def _train(run_dir, *overrides: str) -> tuple[str, ...]:
    return ("train", f"run.dir={run_dir}", "logging.progress=false", *overrides)


def _interrupted_copy(full, dst, keep_step: int):
    """A run directory as if the run had died right after checkpointing `keep_step`."""
    shutil.copytree(full, dst)
    (dst / "summary.json").unlink()
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > keep_step:
            shutil.rmtree(ckpt)
    return dst


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """This file's trainings: the 1-process ones in one interpreter, the 2-process ones in one torchrun job, then
    the resumes of their interrupted copies in one more interpreter. Returns (directory, {resume: its CLI result})."""
    base = tmp_path_factory.mktemp("checkpoint")
    first = cli_in_one_process(
        _train(base / "full", *SMALL),
        _train(base / "keep2", *SMALL, "train.checkpoint_keep=2"),
        _train(base / "diverge", *DIVERGE, "train.log_every=1"),
    )
    assert all(r.returncode == 0 for r in first), [r.stderr[-2000:] for r in first]
    train_in_one_job(
        base,
        {
            "w2": (*SMALL, "batch.micro_size=8", "logging.progress=false"),
            "uninterrupted": (*KILLED, "logging.progress=false"),
        },
    )
    _interrupted_copy(base / "full", base / "resumed", keep_step=10)
    broken = _interrupted_copy(base / "full", base / "broken", keep_step=20)
    state = broken / "checkpoints/step_00000020/state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    _interrupted_copy(base / "w2", base / "w1", keep_step=10)
    names = ("resumed", "broken", "w1")
    resumes = cli_in_one_process(
        _train(base / "resumed", *SMALL),
        _train(base / "broken", *SMALL),
        _train(base / "w1", *SMALL, "batch.micro_size=8"),
    )
    return base, dict(zip(names, resumes))


def test_checkpoints_are_complete_directories_with_a_manifest_and_only_the_newest_are_kept(
    trained,
):
    run = trained[0] / "keep2"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000020", "step_00000030"]
    manifest = json.loads((run / "checkpoints/step_00000030/manifest.json").read_text())
    assert manifest["step"] == 30 and manifest["meta"]["batch.global_size"] == 32
    assert set(manifest["files"]) == {"state.pt"}


def test_resuming_from_a_checkpoint_is_bit_identical_to_never_stopping(trained):
    base, results = trained
    full, resumed_dir = base / "full", base / "resumed"
    assert results["resumed"].returncode == 0, results["resumed"].stderr
    assert _summary(resumed_dir)["params_sha256"] == _summary(full)["params_sha256"]
    assert [r["step"] for r in metrics(resumed_dir)] == list(range(1, 31))
    assert [r["loss"] for r in metrics(resumed_dir)] == [r["loss"] for r in metrics(full)]


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(trained):
    base, results = trained
    result = results["broken"]
    assert result.returncode == 0, result.stderr
    warnings = [
        line for line in result.stderr.splitlines() if line.startswith("largebatch: warning:")
    ]
    assert len(warnings) == 1 and "step_00000020" in warnings[0] and "checksum" in warnings[0]
    assert "resuming from" in result.stdout and "step_00000010 at step 10" in result.stdout
    assert _summary(base / "broken")["params_sha256"] == _summary(base / "full")["params_sha256"]


def test_a_world_size_2_checkpoint_resumes_at_world_size_1_with_the_same_global_batch(trained):
    base, results = trained
    full, elastic_dir = base / "w2", base / "w1"
    reference = _summary(full)
    assert (reference["world_size"], reference["accum_steps"]) == (2, 2)
    assert results["w1"].returncode == 0, results["w1"].stderr
    elastic = _summary(elastic_dir)
    assert (elastic["world_size"], elastic["micro_batch"], elastic["accum_steps"]) == (1, 8, 4)
    a, b = torch.load(full / "model.pt"), torch.load(elastic_dir / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_kill_9_of_a_worker_is_survived_by_torchrun_restart_and_resume(trained, run_dirs):
    """A real SIGKILL of one worker mid-run: torchrun restarts the group, which resumes from the last checkpoint."""
    run = run_dirs("killed")
    kill_one_worker_mid_run(run, KILLED, 50, "step_00000040")
    assert _summary(run)["params_sha256"] == _summary(trained[0] / "uninterrupted")["params_sha256"]
    assert [r["step"] for r in metrics(run)] == list(range(1, 121))


def test_nonfinite_steps_are_skipped_and_counted(trained):
    run = trained[0] / "diverge"
    summary = _summary(run)
    assert summary["nonfinite_steps"] > 0
    assert metrics(run)[-1]["nonfinite_steps"] == summary["nonfinite_steps"]
    assert all(torch.isfinite(t).all() for t in torch.load(run / "model.pt").values())


def test_nonfinite_stop_ends_the_run_with_one_line(run_dirs):
    """A real process: its exit code is the point."""
    result = cli("train", f"run.dir={run_dirs('stop')}", *DIVERGE, "train.nonfinite=stop")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("largebatch: stopped: non-finite loss or gradient at step")


@pytest.fixture
def finished_run(trained, run_dirs):
    """A copy of the finished SMALL run: a test may change it."""
    return shutil.copytree(trained[0] / "full", run_dirs("done"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.resume={missing}", "does not exist"),
        ("run.resume={empty}", "is unusable: no manifest.json"),
        ("batch.global_size=64", "was trained with batch.global_size=32, this config has 64"),
        ("model.width=64", "was trained with model.width=32, this config has 64"),
        ("run.seed=5", "was trained with run.seed=0, this config has 5"),
        ("train.nonfinite=ignore", "train.nonfinite='ignore' is not one of skip, stop"),
        ("train.checkpoint_keep=0", "train.checkpoint_keep=0 must be positive"),
        ("train.checkpoint_every=-1", "train.checkpoint_every=-1 must not be negative"),
    ],
)
def test_bad_resume_inputs_are_one_line_errors(finished_run, tmp_path, override, message):
    """User errors, found before any process group: in this process, but for one case in a real one (its exit code)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    result = (cli if override == "run.resume={missing}" else cli_in_process)(
        "train",
        *SMALL,
        f"run.dir={finished_run}",
        override.format(missing=tmp_path / "nope", empty=empty),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


def test_an_explicit_corrupt_checkpoint_is_a_one_line_error(finished_run):
    ckpt = finished_run / "checkpoints/step_00000030"
    (ckpt / "state.pt").write_bytes(b"garbage")
    result = cli_in_process("train", *SMALL, f"run.dir={finished_run}", f"run.resume={ckpt}")
    assert result.returncode == 2 and "does not match its checksum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_non_integer_local_rank_is_a_one_line_error():
    result = cli_in_process(
        "train", env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "LOCAL_RANK": "x"}
    )
    assert result.returncode == 2 and "LOCAL_RANK='x' must be an integer" in result.stderr
