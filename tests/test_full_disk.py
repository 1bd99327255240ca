"""A full disk during a checkpoint, on a real full filesystem (a tmpfs mounted in a user namespace, so the C++
writers of torch.save, torch.distributed.checkpoint and DeepSpeed fail as they would): every rank stops within
seconds with one line, the last good checkpoint stays, and a rerun where there is space continues exactly."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, torchrun, train_in_one_job

from largebatch.stop import StopFlags

ENGINES = {
    "ddp": ("engine.name=ddp",),
    "fsdp": ("engine.name=fsdp",),
    "zero2": ("engine.name=deepspeed", "engine.zero_stage=2"),
}
DISK = {"ddp": "3m", "fsdp": "3m", "zero2": "5m"}
"""A tmpfs that holds one checkpoint (2.3, 2.4 and 3.5 MB) but not two: the one at step 2 is written, step 4's fails."""
JOB = (
    "model.width=512",
    "model.depth=2",
    "train.steps=6",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "logging.progress=false",
)
FULL_DISK = """
set -u
mount -t tmpfs -o size="$1" tmpfs "$2"
shift 2
"$@" > "$OUT/output" 2>&1
echo $? > "$OUT/rc"
date +%s.%N > "$OUT/ended"
stat -c %.9Y "$MNT/run/metrics.jsonl" > "$OUT/last_log"
cp -a "$MNT/run" "$OUT/run"
"""
"""In a new user and mount namespace: mount the tmpfs, train on it, note when the last step was logged and when
every process had exited, and copy the run directory out (the tmpfs goes with the namespace)."""


def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_user_namespaces = pytest.mark.skipif(
    not _user_namespaces(),
    reason="mounting a small tmpfs needs 'unshare -rm' (unprivileged user namespaces), not permitted here",
)


@pytest.fixture(scope="module")
def full_disk_runs(tmp_path_factory) -> dict[str, Path]:
    """Each engine's job on a full tmpfs (its output, exit code and timing beside the copied run directory), then
    one torchrun job that trains each uninterrupted and reruns each copy where there is space."""
    base = tmp_path_factory.mktemp("full_disk")
    found = {}
    for engine, args in ENGINES.items():
        out, mount = base / f"{engine}_out", base / f"{engine}_tmpfs"
        out.mkdir()
        mount.mkdir()
        command = [
            *torchrun(2),
            "-m",
            "largebatch",
            "train",
            f"run.dir={mount}/run",
            *JOB,
            *args,
        ]
        subprocess.run(
            ["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", DISK[engine], str(mount), *command],
            env={**os.environ, "OUT": str(out), "MNT": str(mount), "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            timeout=300,
            check=True,
        )
        shutil.copytree(out / "run", base / f"{engine}_rerun")
        found[engine] = out
    train_in_one_job(
        base,
        {
            **{f"{engine}_uninterrupted": (*JOB, *args) for engine, args in ENGINES.items()},
            **{f"{engine}_rerun": (*JOB, *args) for engine, args in ENGINES.items()},
        },
    )
    return {"base": base, **found}


@needs_user_namespaces
@pytest.mark.parametrize("engine", ENGINES)
def test_a_full_disk_during_a_checkpoint_stops_every_rank_within_seconds_with_one_line_and_the_rerun_is_exact(
    engine, full_disk_runs
):
    out, base = full_disk_runs[engine], full_disk_runs["base"]
    output = (out / "output").read_text()
    assert int((out / "rc").read_text()) == 1, output[-3000:]  # torchrun's code for a failed worker
    ours = [line for line in output.splitlines() if line.startswith("largebatch:")]
    assert len(ours) == 1 and ours[0].startswith(
        "largebatch: stopped: cannot write a checkpoint under"
    ), output[-3000:]
    assert "[rank0]:" not in output and "[rank1]:" not in output, output[
        -3000:
    ]  # no worker traceback
    assert output.count("Traceback") <= output.count("ChildFailedError"), output[
        -3000:
    ]  # only torchrun's
    seconds = float((out / "ended").read_text()) - float((out / "last_log").read_text())
    assert seconds < 30
    run = out / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][
        -1
    ] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    kept = (base / f"{engine}_rerun" / "metrics.jsonl").read_text().splitlines()[:2]
    assert (
        kept == (run / "metrics.jsonl").read_text().splitlines()[:2]
    )  # resumed at step 2, not retrained
    rerun = json.loads((base / f"{engine}_rerun" / "summary.json").read_text())
    reference = json.loads((base / f"{engine}_uninterrupted" / "summary.json").read_text())
    assert rerun["steps"] == 6
    assert rerun["params_sha256"] == reference["params_sha256"]


ONE_RANK_FAILS = """
import errno, os, sys
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

write = TorchCheckpointEngine.save
def save(self, state_dict, path, **kwargs):
    if os.environ["RANK"] == "1" and "optim_states" in str(getattr(path, "name", path)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, state_dict, path, **kwargs)
TorchCheckpointEngine.save = save

from largebatch.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""`largebatch` whose rank 1 cannot write its ZeRO shard: rank 0's writes succeed and it goes on to DeepSpeed's
closing barrier."""


def test_a_write_failing_on_one_rank_inside_deepspeeds_save_stops_every_rank_with_its_reason(
    tmp_path,
):
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    run = tmp_path / "run"
    done = subprocess.run(
        [
            *torchrun(2),
            str(script),
            "train",
            f"run.dir={run}",
            *JOB,
            *ENGINES["zero2"],
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,  # before, rank 0 waited in DeepSpeed's barrier and rank 1 in ours: a hang
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    ours = [line for line in output.splitlines() if line.startswith("largebatch:")]
    assert ours == [
        f"largebatch: stopped: cannot write a checkpoint under {run}/checkpoints: No space left on device; "
        f"free space or fix the permissions of run.dir"
    ], output[-3000:]
    assert "[rank0]:" not in output and "[rank1]:" not in output, output[-3000:]
    assert list((run / "checkpoints").iterdir()) == []


def _full_disk_in_torch_save() -> RuntimeError:
    """What torch.save into a Python file raises on a full disk: a RuntimeError whose context is the OSError."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except (
            OSError
        ):  # torch raises its own error while handling it, so the OSError is only the context
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # noqa: B904
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    "wrapped", [False, True], ids=["torch.save", "torch.distributed.checkpoint"]
)
def test_a_full_disk_is_named_whatever_exception_carries_it(tmp_path, wrapped):
    from torch.distributed.checkpoint.api import CheckpointException

    error = _full_disk_in_torch_save()
    if wrapped:
        error = CheckpointException("CheckpointException ranks:dict_keys([1])", {1: (error, None)})
    flags = StopFlags(tmp_path)
    with flags.guard("a checkpoint"):
        raise error
    assert flags.fault == (
        "cannot write a checkpoint: No space left on device; free space or fix the permissions of run.dir"
    )


def test_a_failed_write_without_an_errno_is_described_with_the_free_space_left(tmp_path):
    flags = StopFlags(tmp_path)
    with flags.guard("model.pt"):
        raise RuntimeError("basic_ios::clear: iostream error")  # a C++ stream keeps no errno
    assert flags.fault.startswith("cannot write model.pt: basic_ios::clear: iostream error (")
    assert flags.fault.endswith(
        " KiB free on run.dir's filesystem); free space or fix the permissions of run.dir"
    )
