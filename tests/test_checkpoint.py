"""Checkpoints: atomic and verified, exact resume, elastic resume, kill -9 under torchrun, non-finite steps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import cli, kill_one_worker_mid_run, metrics, train

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


def _interrupted_copy(full, dst, keep_step: int):
    """A run directory as if the run had died right after checkpointing `keep_step`."""
    shutil.copytree(full, dst)
    (dst / "summary.json").unlink()
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > keep_step:
            shutil.rmtree(ckpt)
    return dst


def test_checkpoints_are_complete_directories_with_a_manifest_and_only_the_newest_are_kept(
    run_dirs,
):
    run = run_dirs("full")
    train(run, *SMALL, "train.checkpoint_keep=2")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000020", "step_00000030"]
    manifest = json.loads((run / "checkpoints/step_00000030/manifest.json").read_text())
    assert manifest["step"] == 30 and manifest["meta"]["batch.global_size"] == 32
    assert set(manifest["files"]) == {"state.pt"}


def test_resuming_from_a_checkpoint_is_bit_identical_to_never_stopping(run_dirs):
    full = run_dirs("full")
    reference = train(full, *SMALL)
    resumed_dir = _interrupted_copy(full, run_dirs("resumed"), keep_step=10)
    resumed = train(resumed_dir, *SMALL)
    assert resumed["params_sha256"] == reference["params_sha256"]
    assert [r["step"] for r in metrics(resumed_dir)] == list(range(1, 31))
    assert [r["loss"] for r in metrics(resumed_dir)] == [r["loss"] for r in metrics(full)]


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(run_dirs):
    full = run_dirs("full")
    reference = train(full, *SMALL)
    broken = _interrupted_copy(full, run_dirs("broken"), keep_step=20)
    state = broken / "checkpoints/step_00000020/state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    result = cli("train", f"run.dir={broken}", "logging.progress=false", *SMALL)
    assert result.returncode == 0, result.stderr
    warnings = [
        line for line in result.stderr.splitlines() if line.startswith("largebatch: warning:")
    ]
    assert len(warnings) == 1 and "step_00000020" in warnings[0] and "checksum" in warnings[0]
    assert "resuming from" in result.stdout and "step_00000010 at step 10" in result.stdout
    assert (
        json.loads((broken / "summary.json").read_text())["params_sha256"]
        == reference["params_sha256"]
    )


def test_a_world_size_2_checkpoint_resumes_at_world_size_1_with_the_same_global_batch(run_dirs):
    full = run_dirs("w2")
    reference = train(full, *SMALL, "batch.micro_size=8", nproc=2)
    assert (reference["world_size"], reference["accum_steps"]) == (2, 2)
    elastic_dir = _interrupted_copy(full, run_dirs("w1"), keep_step=10)
    elastic = train(elastic_dir, *SMALL, "batch.micro_size=8")
    assert (elastic["world_size"], elastic["micro_batch"], elastic["accum_steps"]) == (1, 8, 4)
    a, b = torch.load(full / "model.pt"), torch.load(elastic_dir / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_kill_9_of_a_worker_is_survived_by_torchrun_restart_and_resume(run_dirs):
    """A real SIGKILL of one worker mid-run: torchrun restarts the group, which resumes from the last checkpoint."""
    config = (
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
    reference = train(run_dirs("uninterrupted"), *config, nproc=2)
    run = run_dirs("killed")
    kill_one_worker_mid_run(run, config, 50, "step_00000040")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params_sha256"] == reference["params_sha256"]
    assert [r["step"] for r in metrics(run)] == list(range(1, 121))


def test_nonfinite_steps_are_skipped_and_counted(run_dirs):
    run = run_dirs("diverge")
    summary = train(
        run,
        "data.size=512",
        "model.width=32",
        "optim.lr=1e20",
        "optim.scaling=none",
        "train.steps=20",
        "train.log_every=1",
    )
    assert summary["nonfinite_steps"] > 0
    assert metrics(run)[-1]["nonfinite_steps"] == summary["nonfinite_steps"]
    assert all(torch.isfinite(t).all() for t in torch.load(run / "model.pt").values())


def test_nonfinite_stop_ends_the_run_with_one_line(run_dirs):
    result = cli(
        "train",
        f"run.dir={run_dirs('stop')}",
        "data.size=512",
        "model.width=32",
        "optim.lr=1e20",
        "optim.scaling=none",
        "train.steps=20",
        "train.nonfinite=stop",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("largebatch: stopped: non-finite loss or gradient at step")


@pytest.fixture
def finished_run(run_dirs):
    run = run_dirs("done")
    train(run, *SMALL)
    return run


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
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(
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
    result = cli("train", *SMALL, f"run.dir={finished_run}", f"run.resume={ckpt}")
    assert result.returncode == 2 and "does not match its checksum" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_non_integer_local_rank_is_a_one_line_error():
    result = cli(
        "train", env={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "LOCAL_RANK": "x"}
    )
    assert result.returncode == 2 and "LOCAL_RANK='x' must be an integer" in result.stderr
