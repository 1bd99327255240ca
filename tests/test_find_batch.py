"""`largebatch find-batch`: the memory/speed table, the stop at the budget, the recommended plan, batch-size-independent outputs."""

from __future__ import annotations

import re

from conftest import cli


def test_training_table_stops_at_the_budget_and_recommends_a_plan_that_keeps_the_global_batch():
    result = cli("find-batch", "--config", "configs/quickstart.yaml", "--memory-limit", "1MiB", "--world-size", "2",
                 "--repeats", "1")
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+) MiB\s+(\d+)\s+(ok|over budget)$", result.stdout, re.M)
    assert [int(r[0]) for r in rows][:4] == [1, 2, 4, 8]
    peaks = [float(r[1]) for r in rows]
    assert peaks == sorted(peaks)  # memory grows with the micro-batch
    assert rows[-1][3] == "over budget" and all(r[3] == "ok" for r in rows[:-1])
    best = int(rows[-2][0])
    assert f"recommend: batch.micro_size={best} → global batch 512 = world 2 × micro {best} × accum {256 // best}" \
        in result.stdout


def test_inference_outputs_do_not_depend_on_the_batch_size():
    result = cli("find-batch", "--config", "configs/quickstart.yaml", "batch.global_size=64", "--inference",
                 "--repeats", "1")
    assert result.returncode == 0, result.stderr
    drift = float(re.search(r"vs one example at a time: (\S+)", result.stdout).group(1))
    assert drift < 1e-4


def test_a_size_without_a_unit_is_a_one_line_error():
    result = cli("find-batch", "--config", "configs/quickstart.yaml", "--memory-limit", "4")
    assert result.returncode == 2 and result.stderr.strip() == (
        "largebatch: error: --memory-limit='4' must be a size with a unit, e.g. 512MiB or 2GiB")


def test_bench_memory_prints_both_ratios():
    result = cli("bench", "memory", "--steps", "1", "--micro", "4")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith(("gpt", "resnet"))}
    for name in ("gpt", "resnet"):
        assert float(rows[name][5]) <= 0.5  # activation ratio with checkpointing


def test_bench_memory_engines_prints_bytes_and_ratios_with_parameters_partitioned_at_zero3():
    result = cli("bench", "memory", "--engines", "ddp,deepspeed", "--micro", "2")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in result.stdout.splitlines()
            if line.startswith(("DDP ", "ZeRO-"))}
    assert list(rows) == ["DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert all(len(row) == 9 for row in rows.values())  # 5 MiB columns, 4 ratios to ZeRO-0
    assert rows["ZeRO-3"][0] < rows["ZeRO-0"][0]  # parameter MiB per rank
