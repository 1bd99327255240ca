"""The wandb sink, against real wandb in offline mode: what it records, and that no wandb failure escapes it."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from largebatch.wandb_sink import WandbSink

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

CONFIG = {
    "run": {"name": "tiny", "seed": 0},
    "batch": {"global_size": 64, "micro_size": None, "accum_steps": None},
    "logging": {"wandb": "offline", "project": None, "progress": False},
    "derived": {
        "world_size": 2,
        "global_batch": 64,
        "micro_batch": 16,
        "accum_steps": 2,
        "peak_lr": 0.4,
    },
}
RECORDS = [
    {
        "step": s,
        "samples": 64 * s,
        "epoch": s / 8,
        "loss": 2.0 / s,
        "lr": 0.1 * s,
        "grad_norm": 1.5 / s,
        "samples_per_s": 5000.0,
        "tokens_per_s": 320000.0,
        "mfu": 0.41,
        "gns": 40.0 + s,
        "trust_ratio/fc1.weight": 0.01 * s,
        "trust_ratio/fc2.weight": 0.02 * s,
    }
    for s in (2, 4, 6)
]
RECORDS[-1].update({"eval/loss": 0.5, "eval/accuracy": 0.9})
SUMMARY = {
    "steps": 6,
    "samples": 384,
    "final_loss": 0.33,
    "eval": {"loss": 0.5, "accuracy": 0.9},
    "global_batch": 64,
    "peak_lr": 0.4,
    "tokens_per_s": 310000.0,
    "mfu": 0.4,
    "params_sha256": "ab" * 32,
}


def read_offline_run(wandb_dir: Path, wait_s: float = 30.0) -> dict:
    """Read every offline run under `wandb_dir` (WANDB_DIR, or the run dir): run count, ids, config, history, summary.

    A `.wandb` file is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then records
    of a 7-byte header (crc32c, length, type FULL/FIRST/MIDDLE/LAST) + payload, never crossing a 32 KiB block,
    each payload one serialized `wandb_internal_pb2.Record`. wandb-core finishes writing the file after
    `run.finish()` returns, so each file is re-read until its `exit` record is there (up to `wait_s`).
    """
    files = sorted(Path(wandb_dir).rglob("offline-run-*/run-*.wandb"))
    out: dict = {
        "run_count": len(files),
        "run_ids": set(),
        "config": {},
        "history": [],
        "history_keys": set(),
        "summary": {},
        "files": files,
    }
    for path in files:
        deadline = time.monotonic() + wait_s
        records = list(_records(path.read_bytes()))
        while (
            not any(r.WhichOneof("record_type") == "exit" for r in records)
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
            records = list(_records(path.read_bytes()))
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["run_ids"].add(record.run.run_id)
                _merge(out["config"], record.run.config.update)
            elif kind == "config":
                _merge(out["config"], record.config.update)
            elif kind == "history":
                row: dict = {}
                _merge(row, record.history.item)
                out["history"].append(row)
                out["history_keys"] |= {k for k in row if not k.startswith("_")}
            elif kind == "summary":
                _merge(out["summary"], record.summary.update)
    out["config"].pop("_wandb", None)
    return out


def _records(data: bytes) -> Iterator[pb.Record]:
    block, header = 32768, 7
    if len(data) < header:
        return
    assert data[:4] == b":W&B", "not a .wandb file"
    pos, pending = header, b""
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0 or pos + header + length > len(data):
            break  # zero padding, or a record still being written
        payload, pos = data[pos + header : pos + header + length], pos + header + length
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _merge(into: dict, items) -> None:
    for item in items:
        keys = list(item.nested_key) or [item.key]
        target = into
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(item.value_json)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb confined to tmp_path, none of the user's WANDB_* settings, its global state torn down afterwards."""
    for name in (
        "WANDB_MODE",
        "WANDB_PROJECT",
        "WANDB_DIR",
        "WANDB_RUN_ID",
        "WANDB_RUN_GROUP",
        "WANDB_RESUME",
        "WANDB_NAME",
        "WANDB_JOB_TYPE",
        "WANDB_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    for name in ("CACHE", "CONFIG", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb-{name.lower()}"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield tmp_path
    wandb.teardown()


def test_offline_sink_records_one_run_with_the_batch_plan_and_every_metric(wandb_env: Path):
    run_dir = wandb_env / "run"
    sink = WandbSink("offline", None, run_dir, CONFIG, "run0123456789ab")
    assert sink.active
    for record in RECORDS:
        sink.log(record)
    sink.finish(SUMMARY)

    run = read_offline_run(run_dir)
    assert run["run_count"] == 1 and run["run_ids"] == {"run0123456789ab"}
    assert run["config"]["derived"] == CONFIG["derived"]
    assert run["config"]["batch"]["global_size"] == 64
    assert {
        "step",
        "samples",
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "mfu",
        "gns",
        "global_batch",
        "trust_ratio/fc1.weight",
        "trust_ratio/fc2.weight",
        "trust_ratio/histogram",
        "eval/accuracy",
    } <= run["history_keys"]
    assert [row["step"] for row in run["history"]] == [2, 4, 6]
    assert run["history"][0]["trust_ratio/histogram"]["_type"] == "histogram"
    assert run["summary"]["final_loss"] == 0.33 and run["summary"]["eval/accuracy"] == 0.9
    assert run["summary"]["params_sha256"] == "ab" * 32
    assert (run["summary"]["tokens_per_s"], run["summary"]["mfu"]) == (310000.0, 0.4)


def test_a_resumed_job_continues_the_same_run(wandb_env: Path):
    run_dir = wandb_env / "run"
    for record in (RECORDS[:1], RECORDS[1:]):
        sink = WandbSink("offline", "p", run_dir, CONFIG, "run0123456789ab")
        for r in record:
            sink.log(r)
        sink.finish(SUMMARY)
    run = read_offline_run(run_dir)
    assert run["run_count"] == 2 and len(run["run_ids"]) == 1
    assert [row["step"] for row in run["history"]] == [2, 4, 6]


def test_wandb_variables_the_user_set_win(wandb_env: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANDB_DIR", str(wandb_env / "elsewhere"))
    (wandb_env / "elsewhere").mkdir()
    monkeypatch.setenv("WANDB_RUN_ID", "users-own-id")
    sink = WandbSink("offline", None, wandb_env / "run", CONFIG, "ignored")
    sink.log(RECORDS[0])
    sink.finish(SUMMARY)
    assert read_offline_run(wandb_env / "elsewhere")["run_ids"] == {"users-own-id"}
    assert not (wandb_env / "run").exists()


@pytest.mark.parametrize(
    "mode, env",
    [
        ("offline", {"WANDB_MODE": "garbage"}),
        ("sometimes", {}),
        ("offline", {"WANDB_RUN_ID": "no/slashes"}),
    ],
)
def test_a_bad_setting_warns_once_and_never_raises(
    wandb_env: Path, monkeypatch: pytest.MonkeyPatch, capsys, mode: str, env: dict
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sink = WandbSink(mode, None, wandb_env / "run", CONFIG, "abc")
    for record in RECORDS:
        sink.log(record)
    sink.finish(SUMMARY)
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("largebatch:")
    ]
    assert len(warnings) == 1 and warnings[0].startswith("largebatch: warning: wandb disabled: ")
    assert not sink.active
    assert read_offline_run(wandb_env)["run_count"] == 0


def test_a_failing_log_call_disables_the_sink_and_training_goes_on(wandb_env: Path, capsys):
    sink = WandbSink("offline", None, wandb_env / "run", CONFIG, "abc")
    sink.log(RECORDS[0])
    wandb.finish()  # the run is closed under the sink: wandb raises on the next log
    for record in RECORDS[1:]:
        sink.log(record)
    sink.finish(SUMMARY)
    warnings = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("largebatch:")
    ]
    assert len(warnings) == 1 and "wandb disabled" in warnings[0]
    assert [row["step"] for row in read_offline_run(wandb_env / "run")["history"]] == [2]


def test_disabled_never_imports_wandb(tmp_path: Path):
    code = (
        "import sys; from pathlib import Path; from largebatch.wandb_sink import WandbSink; "
        "s = WandbSink('disabled', None, Path('run'), {}, 'x'); s.log({'step': 1, 'loss': 1.0}); s.finish({}); "
        "assert 'wandb' not in sys.modules and not Path('run').exists()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_a_two_process_training_run_writes_exactly_one_wandb_run_with_the_plan_and_metrics(
    wandb_env: Path, run_dirs
):
    from conftest import train

    run = run_dirs("wandb2")
    train(
        run,
        "data.size=512",
        "model.width=32",
        "batch.global_size=32",
        "train.steps=6",
        "train.log_every=2",
        "logging.wandb=offline",
        "logging.project=lb-test",
        nproc=2,
    )
    offline = read_offline_run(wandb_env)
    assert offline["run_count"] == 1
    assert offline["run_ids"] == {(run / "wandb_run_id").read_text().strip()}
    derived = offline["config"]["derived"]
    assert (derived["world_size"], derived["global_batch"], derived["micro_batch"]) == (2, 32, 16)
    assert {
        "loss",
        "lr",
        "grad_norm",
        "samples",
        "samples_per_s",
        "mfu",
        "eval/accuracy",
    } <= offline["history_keys"]
    assert "tokens_per_s" not in offline["history_keys"]  # classification: one target per example
    assert len(offline["history"]) == 3


def test_a_wandb_init_failure_leaves_a_finished_run_with_complete_metrics(
    wandb_env: Path, run_dirs
):
    from conftest import cli, metrics

    run = run_dirs("wandb_broken")
    result = cli(
        "train",
        f"run.dir={run}",
        "data.size=512",
        "model.width=32",
        "train.steps=6",
        "train.log_every=1",
        "logging.wandb=online",
        "logging.progress=false",
        env={"WANDB_MODE": "not-a-mode"},
    )
    assert result.returncode == 0, result.stderr
    wandb_lines = [line for line in result.stderr.splitlines() if "wandb" in line.lower()]
    assert len(wandb_lines) == 1 and wandb_lines[0].startswith(
        "largebatch: warning: wandb disabled:"
    )
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6] and (
        run / "summary.json"
    ).exists()
