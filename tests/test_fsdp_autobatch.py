"""batch.micro_size=auto on FSDP2: the micro-batch is found before the first step, as on DDP; a mid-run
out-of-memory error, which FSDP2 cannot redo (its micro-steps are collective), stops every rank in one line, also
when it strikes one rank inside a sharded block's backward while its peer goes on into the reduce-scatter."""

from __future__ import annotations

import time

import pytest
from conftest import ROOT, cli, metrics, train_in_one_job

TINY_LM = (
    f"--config={ROOT / 'configs/lamb-lm.yaml'}",
    "model.width=32",
    "data.context=32",
    "batch.global_size=32",
    "train.steps=6",
    "schedule.warmup_steps=2",
    "train.log_every=1",
    "logging.progress=false",
    "batch.micro_size=auto",
    "batch.memory_limit=1MiB",  # leaves room for micro-batch 2 of the 16 examples per rank
)


def test_fsdp_finds_the_same_micro_batch_as_ddp_under_a_memory_limit(tmp_path) -> None:
    train_in_one_job(
        tmp_path, {engine: (*TINY_LM, f"engine.name={engine}") for engine in ("ddp", "fsdp")}
    )
    ddp, fsdp = metrics(tmp_path / "ddp"), metrics(tmp_path / "fsdp")
    assert {r["micro_batch"] for r in fsdp} == {r["micro_batch"] for r in ddp} == {2}
    for a, b in zip(fsdp, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_an_out_of_memory_error_in_one_fsdp_ranks_block_backward_mid_run_stops_every_rank_in_one_line(
    tmp_path,
) -> None:
    result = cli(
        "train",
        *TINY_LM,
        "engine.name=fsdp",
        f"run.dir={tmp_path}",
        nproc=2,
        env={"LARGEBATCH_INJECT_OOM_AT_STEP": "3", "LARGEBATCH_INJECT_OOM_RANK": "1"},
        timeout=180,
    )
    ended = time.time()
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert output.count("largebatch:") == 1
    assert (
        "largebatch: stopped: out of memory at step 3 on engine.name=fsdp, which cannot redo a step; "
        "set batch.micro_size=1 or raise batch.memory_limit" in output
    )
    assert "[rank0]:" not in output and "[rank1]:" not in output, output[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert (
        ended - (tmp_path / "metrics.jsonl").stat().st_mtime < 30
    )  # step 2 logged → every rank out
