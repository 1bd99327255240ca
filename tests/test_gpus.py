"""`largebatch plan --gpus`: one planner row by hand, the α–β network fit against a measured all-reduce, and the
one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import cli, cli_in_process

from largebatch import gpus, network

QUICK = ["--gpus", "8,16", "--bcrit", "1000", "--step-time", "0.1"]
"""A plan that needs no measurement: the default config's MLP, built on the meta device only."""


def test_one_row_by_hand():
    net = network.Network(latency=10e-6, bandwidth=12.5e9, intra_bandwidth=300e9, gpus_per_node=8)
    (row,) = gpus.table(
        [16],
        grad_bytes=100e6,
        example_s=1e-3,
        micro_batch=32,
        b_crit=1000,
        net=net,
        global_batch=4096,
        s_min=1000,
    )
    # 100 MB in DDP's buckets: 1 MiB, 3 × 25 MiB and the rest: 5 all-reduces.
    assert network.buckets(100e6) == [2**20, 25 * 2**20, 25 * 2**20, 25 * 2**20, 20308224]
    # Each: a ring of 8 inside the node (2·7 latencies, 2·7/8 of the bytes at 300 GB/s), then a ring of 2 nodes
    # (2·1 latencies, 2·1/2 of the bytes at 12.5 GB/s); bytes are paid once over all buckets.
    comm = 5 * (14 + 2) * 10e-6 + 1.75 * 100e6 / 300e9 + 1.0 * 100e6 / 12.5e9
    assert comm == pytest.approx(0.0093833333)
    compute = 4096 / 16 * 1e-3  # 256 examples per GPU at 1 ms each
    steps = 1000 * (1 + 1000 / 4096)  # S_min (1 + B_crit / B)
    assert row.accum_steps == 8  # 256 per GPU / micro-batch 32
    assert row.comm_s == pytest.approx(comm, rel=1e-12)
    assert row.step_s == pytest.approx(compute + comm, rel=1e-12)
    assert row.comm_share == pytest.approx(comm / (compute + comm), rel=1e-12)
    assert row.efficiency == pytest.approx(
        0.256 / 0.2653833333, rel=1e-9
    )  # fixed batch: the compute share
    assert row.steps == pytest.approx(1244.140625, rel=1e-12)
    assert row.time_s == pytest.approx(steps * (compute + comm), rel=1e-12)
    assert row.gpu_hours == pytest.approx(16 * steps * (compute + comm) / 3600, rel=1e-12)


def test_per_gpu_view_trades_steps_for_gpus_and_picks_within_ten_percent():
    net = network.Network(10e-6, 12.5e9, 300e9, 8)
    rows = gpus.table(
        [1, 8, 64, 512],
        grad_bytes=400e6,
        example_s=1e-3,
        micro_batch=32,
        b_crit=4096,
        net=net,
        per_gpu_batch=64,
    )
    assert [r.global_batch for r in rows] == [64, 512, 4096, 32768]
    assert rows[0].comm_s == 0 and rows[0].efficiency == pytest.approx(1)
    # Examples-efficiency × compute share: (b + B_crit) / (G·b + B_crit) at 8 GPUs.
    assert rows[1].efficiency == pytest.approx(
        (64 + 4096) / (512 + 4096) * rows[1].compute_s / rows[1].step_s
    )
    fastest, frugal = gpus.choose(rows)
    assert fastest.time_s == min(r.time_s for r in rows)
    assert frugal.time_s <= 1.1 * fastest.time_s
    assert frugal.gpu_hours == min(r.gpu_hours for r in rows if r.time_s <= 1.1 * fastest.time_s)


def test_plan_prints_both_views_answers_and_assumptions(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep.json").write_text(json.dumps({"fit": {"b_crit": 900.0, "s_min": 250.0}}))
    result = cli_in_process("plan", *QUICK[:2], "--bcrit", str(sweep), "--step-time", "0.1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"B_crit 900 (sweep fit in {sweep / 'sweep.json'}); S_min 250 steps" in out
    assert out.count("answer: ") == 2 and "NOT overlapped with backward" in out
    assert (
        "global batch fixed at 256" in out
        and "per-GPU batch fixed at 32 (the config's share on 8 GPUs" in out
    )


def test_bcrit_from_noise_scale_and_cbs_files(tmp_path):
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"b_simple": 321.0}))
    cbs = tmp_path / "cbs.jsonl"
    cbs.write_text('{"critical_batch": 64}\n{"critical_batch": 128}\n')
    assert gpus.critical_batch(str(noise))[:2] == (321.0, None)
    assert gpus.critical_batch(str(cbs))[:2] == (128.0, None)


@pytest.mark.alone
def test_network_fit_predicts_a_second_models_gradient_all_reduce(tmp_path):
    """2 gloo processes: fit α and β on an all-reduce size sweep, predict an MLP's DDP bucket all-reduce from its
    gradient bytes alone: each round's fit against the same round's measurement, median error within 25 %
    (side by side, so the load of a shared machine moves both); `plan --network` reads the fit."""
    fit = tmp_path / "fit.json"
    result = cli("bench", "comm", "--rounds", "7", "--out", str(fit))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    saved = json.loads(fit.read_text())
    check = saved["check"]
    assert len(check["buckets"]) >= 2 and check["bytes"] > 30e6
    assert abs(check["round_error"]) < 0.25, result.stdout
    planned = cli_in_process("plan", *QUICK, "--network", str(fit))
    assert planned.returncode == 0, planned.stderr
    assert f"latency {saved['latency_s'] * 1e6:.3g} µs" in planned.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpus", "0", "--bcrit", "10"], "--gpus='0' must be positive GPU counts"),
        (["--gpus", "8,x", "--bcrit", "10"], "--gpus='8,x' must be positive GPU counts"),
        ([*QUICK, "--bandwidth", "100"], "--bandwidth='100' must be a positive rate with a unit"),
        ([*QUICK, "--intra-bandwidth", "9 furlongs/s"], "--intra-bandwidth='9 furlongs/s' must be"),
        ([*QUICK, "--latency", "10"], "--latency='10' must be a time with a unit"),
        ([*QUICK, "--steps-at", "4096"], "--steps-at='4096' must be BATCH:STEPS"),
        ([*QUICK, "--network", "no/fit.json"], "--network no/fit.json: no such file"),
        (["--gpus", "8", "--bcrit", "no/sweep"], "--bcrit no/sweep: no such file"),
        (["--gpus", "8", "--bcrit", "-5"], "--bcrit=-5 must be a positive batch size"),
        (["--gpus", "8"], "--gpus needs the critical batch"),
        (
            ["--gpus", "3,8", "--bcrit", "10"],
            "batch plan on the fewest --gpus count, 3: batch.global_size=256",
        ),
        (["--bcrit", "10"], "--bcrit only apply with --gpus"),
        (
            [*QUICK, "--world-size", "4"],
            "--world-size and --nproc-per-node do not apply with --gpus",
        ),
        ([*QUICK[:4], "--step-time", "0"], "--step-time=0.0 must be positive seconds"),
        ([*QUICK, "--gpus-per-node", "0"], "--gpus-per-node=0 must be 1 or more"),
    ],
)
def test_bad_values_are_one_line_errors(args, message):
    result = cli_in_process("plan", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
