"""`largebatch find-batch`: the memory/speed table, the stop at the budget, the headroom, the knee, the
recommended plan, batch-size-independent outputs."""

from __future__ import annotations

import re
import subprocess

import pytest
from conftest import cli, cli_in_process

from largebatch.batch import plan
from largebatch.find_batch import Row, advice, knee, status

ROW = re.compile(
    r"^\s+(\d+)\s+([\d.]+) MiB\s+(\d+)\s+(ok|fits budget, not headroom|over budget)(  ← knee)?$",
    re.M,
)


@pytest.fixture(scope="module")
def table() -> subprocess.CompletedProcess:
    """The quickstart (512 examples on 2 ranks) under a 1 MiB budget, 0.85 MiB usable after the default headroom."""
    result = cli(
        "find-batch",
        "--config",
        "configs/quickstart.yaml",
        "--memory-limit",
        "1MiB",
        "--world-size",
        "2",
        "--repeats",
        "1",
    )
    assert result.returncode == 0, result.stderr
    return result


def test_training_table_stops_at_the_budget_and_recommends_a_plan_that_keeps_the_global_batch(
    table,
):
    assert "budget 1.00 MiB, usable 0.85 MiB after 15% headroom" in table.stdout
    rows = ROW.findall(table.stdout)
    assert [int(r[0]) for r in rows][:4] == [1, 2, 4, 8]
    peaks = [float(r[1]) for r in rows]
    assert peaks == sorted(peaks)  # memory grows with the micro-batch
    assert rows[-1][3] != "ok" and all(
        r[3] == "ok" and r[1] and float(r[1]) <= 0.85 for r in rows[:-1]
    )
    best = int(re.search(r"^recommend: batch.micro_size=(\d+)", table.stdout, re.M).group(1))
    assert (
        f"recommend: batch.micro_size={best} → global batch 512 = world 2 × micro {best} × accum {256 // best}"
        in table.stdout
    )


def test_the_knee_row_is_the_smallest_within_five_percent_of_the_fastest_that_fits_and_is_recommended(
    table,
):
    rates = {int(r[0]): int(r[2]) for r in ROW.findall(table.stdout) if r[3] == "ok"}
    marked = [int(r[0]) for r in ROW.findall(table.stdout) if r[4]]
    bend = int(re.search(r"^knee: micro (\d+)", table.stdout, re.M).group(1))
    assert marked == [bend]
    assert rates[bend] >= 0.95 * max(rates.values()) - 1  # printed rates are rounded
    assert all(
        rate < 0.95 * max(rates.values()) + 1 for micro, rate in rates.items() if micro < bend
    )
    assert (
        f"recommend: batch.micro_size={bend} → " in table.stdout
    )  # every size here divides the share of 256
    assert re.search(
        rf"^accumulation {256 // bend} × micro {bend}.*: (worth it|it costs)", table.stdout, re.M
    )


def test_a_size_that_fits_the_budget_but_not_the_headroom_is_not_recommended(table):
    peak = {int(r[0]): float(r[1]) for r in ROW.findall(table.stdout)}[16]
    budget = (
        f"{peak / 0.9:.4f}MiB"  # 16 takes 90% of it: within the budget, inside the 15% headroom
    )
    result = cli(
        "find-batch",
        "--config",
        "configs/quickstart.yaml",
        "--memory-limit",
        budget,
        "--world-size",
        "2",
        "--repeats",
        "1",
    )
    assert result.returncode == 0, result.stderr
    statuses = {int(r[0]): r[3] for r in ROW.findall(result.stdout)}
    assert (
        statuses[8] == "ok" and statuses[16] == "fits budget, not headroom" and max(statuses) == 16
    )
    assert re.search(r"^recommend: batch.micro_size=[1248] → ", result.stdout, re.M)


@pytest.mark.parametrize("flag", ["--headroom=1", "--headroom=-0.1", "--knee=1.5"])
def test_a_fraction_outside_zero_to_one_is_a_one_line_error(flag):
    result = cli_in_process("find-batch", "--config", "configs/quickstart.yaml", flag)
    name, value = flag.split("=")
    assert result.returncode == 2 and re.fullmatch(
        rf"largebatch: error: {name}={value} must be at least 0 and below 1: .*, e\.g\. {name} 0\.\d+\n",
        result.stderr,
    )


def test_status_keeps_the_headroom_free():
    assert status(85, 100, 0.15) == "ok"
    assert status(86, 100, 0.15) == "fits budget, not headroom"
    assert status(101, 100, 0.15) == "over budget"
    assert status(10**12, None, 0.15) == "ok"


def test_the_knee_is_the_smallest_size_within_the_tolerance_of_the_best():
    rates = {8: 500.0, 16: 900.0, 32: 970.0, 64: 1000.0}
    assert knee(rates, 0.05) == 32
    assert knee(rates, 0.1) == 16
    assert knee(rates, 0.0) == 64
    assert (
        knee({32: 1000.0, 64: 980.0}, 0.05) == 32
    )  # a larger size measured slower (noise) does not move it


def test_accumulation_at_the_knee_is_worth_it_when_larger_sizes_buy_little():
    rows = [
        Row(16, 1, 600.0, "ok"),
        Row(32, 2, 970.0, "ok"),
        Row(64, 4, 1000.0, "ok"),
        Row(128, 9, 1010.0, "fits budget, not headroom"),
    ]
    assert advice(rows, plan(2, 512), 0.05) == [
        "knee: micro 32, the smallest size that fits within 5% of the best samples/s (970 vs 1000 at micro 64)",
        "recommend: batch.micro_size=32 → global batch 512 = world 2 × micro 32 × accum 8 "
        "(the knee: within 5% of the fastest that fits, with the most memory left)",
        "accumulation 8 × micro 32 runs at 0.96× the samples/s of micro 128, which does not fit: worth it, "
        "larger micro-batches buy only 4% more samples/s",
    ]


def test_accumulation_that_costs_more_than_the_tolerance_says_how_to_win_it_back():
    rows = [Row(32, 2, 1000.0, "ok"), Row(64, 9, 2000.0, "over budget")]
    assert advice(rows, plan(2, 512), 0.05)[2] == (
        "accumulation 8 × micro 32 runs at 0.50× the samples/s of micro 64, which does not fit: it costs 50% of "
        "samples/s; free memory for micro 64 (train.precision=bf16) to win it back"
    )


def test_a_knee_that_does_not_divide_the_share_falls_back_to_the_largest_size_that_does():
    rows = [
        Row(8, 1, 300.0, "ok"),
        Row(16, 2, 500.0, "ok"),
        Row(32, 4, 1000.0, "ok"),
        Row(48, 9, 0.0, "over budget"),
    ]
    knee_line, recommended, accumulation = advice(rows, plan(2, 96), 0.05)
    assert recommended == (
        "recommend: batch.micro_size=16 → global batch 96 = world 2 × micro 16 × accum 3 (the largest "
        "size that fits and divides the per-rank share 48; none at or above the knee (32) does)"
    )
    assert accumulation == (
        "accumulation 3 × micro 16 runs at 0.50× the samples/s of micro 32: it costs 50% of "
        "samples/s; no faster size that fits divides the per-rank share 48"
    )


def test_no_accumulation_when_the_whole_share_is_the_knee():
    rows = [Row(32, 2, 500.0, "ok"), Row(64, 4, 1000.0, "ok")]
    assert advice(rows, plan(2, 128), 0.05)[1:] == [
        "recommend: batch.micro_size=64 → global batch 128 = world 2 × micro 64 × accum 1 "
        "(the knee: within 5% of the fastest that fits, with the most memory left)",
        "accumulation: not needed, the per-rank share of 64 fits as one micro-batch",
    ]


def test_inference_outputs_do_not_depend_on_the_batch_size():
    result = cli(
        "find-batch",
        "--config",
        "configs/quickstart.yaml",
        "batch.global_size=64",
        "--inference",
        "--repeats",
        "1",
    )
    assert result.returncode == 0, result.stderr
    drift = float(re.search(r"vs one example at a time: (\S+)", result.stdout).group(1))
    assert drift < 1e-4


def test_a_size_without_a_unit_is_a_one_line_error():
    result = cli("find-batch", "--config", "configs/quickstart.yaml", "--memory-limit", "4")
    assert result.returncode == 2 and result.stderr.strip() == (
        "largebatch: error: --memory-limit='4' must be a size with a unit, e.g. 512MiB or 2GiB"
    )


def test_bench_memory_prints_both_ratios():
    result = cli("bench", "memory", "--steps", "1", "--micro", "4")
    assert result.returncode == 0, result.stderr
    rows = {
        line.split()[0]: line.split()
        for line in result.stdout.splitlines()
        if line.startswith(("gpt", "resnet"))
    }
    for name in ("gpt", "resnet"):
        assert float(rows[name][5]) <= 0.5  # activation ratio with checkpointing


def test_bench_memory_engines_prints_bytes_and_ratios_with_parameters_partitioned_at_zero3():
    result = cli("bench", "memory", "--engines", "ddp,deepspeed", "--micro", "2")
    assert result.returncode == 0, result.stderr
    rows = {
        line.split()[0]: [float(v) for v in line.split()[1:]]
        for line in result.stdout.splitlines()
        if line.startswith(("DDP ", "ZeRO-"))
    }
    assert list(rows) == ["DDP", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert all(len(row) == 9 for row in rows.values())  # 5 MiB columns, 4 ratios to ZeRO-0
    assert rows["ZeRO-3"][0] < rows["ZeRO-0"][0]  # parameter MiB per rank
