"""Gradient noise scale: the estimator recovers a known noise scale, and the trainer measures it on any topology."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cli_in_process, metrics, train_in_one_job

from largebatch.noise import NoiseScale, estimate


def test_the_estimator_recovers_a_known_noise_scale():
    """Per-example gradients G + ε with |G|² = 4 and tr(Σ) = 400: B_noise = tr(Σ)/|G|² = 100."""
    gen = torch.Generator().manual_seed(0)
    dim, b_small, b_big = 100, 8, 64
    true_g = torch.full((dim,), 0.2)
    g2s, traces = [], []
    for _ in range(400):
        examples = true_g + 2.0 * torch.randn(b_big, dim, generator=gen)
        sq_small = examples[:b_small].mean(0).square().sum().item()
        sq_big = examples.mean(0).square().sum().item()
        g2, trace = estimate(sq_small, b_small, sq_big, b_big)
        g2s.append(g2)
        traces.append(trace)
    assert statistics.mean(g2s) == pytest.approx(4.0, rel=0.1)
    assert statistics.mean(traces) == pytest.approx(400.0, rel=0.1)
    assert statistics.mean(traces) / statistics.mean(g2s) == pytest.approx(100.0, rel=0.15)


def test_smoothing_is_an_exponential_moving_average_of_both_estimates():
    gns = NoiseScale(decay=0.5)
    assert gns.record() == {}
    gns.update(2.0, 1, 1.0, 3)
    first = gns.record()
    assert first["gns"] == pytest.approx(first["gns/trace"] / first["gns/grad_sq"])
    g2, trace = estimate(3.0, 1, 1.0, 3)
    gns.update(3.0, 1, 1.0, 3)
    second = gns.record()
    assert second["gns/grad_sq"] == pytest.approx(0.5 * first["gns/grad_sq"] + 0.5 * g2)
    assert second["gns/trace"] == pytest.approx(0.5 * first["gns/trace"] + 0.5 * trace)


COMMON = (
    "data.size=4096",
    "model.width=64",
    "batch.global_size=128",
    "train.steps=60",
    "train.log_every=2",
    "optim.lr=0.05",
    "optim.scaling=none",
)


GROUND_TRUTH = {"sigma0": (0.0, 1.0), "sigma2": (2.0, 1.0)}
"""(σ, |w − w*|) of the linear-regression task: B_simple = 17 and 81."""
ACCUMULATED = (*COMMON, "batch.micro_size=32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One job on 2 processes and one on 1: the linear-regression task at each σ (micro 128 on 2 processes, 64 × 4
    accumulated on 1), and COMMON measuring the noise scale on 2 processes, and on 1 with accumulation beside the
    same run not measuring."""
    base = tmp_path_factory.mktemp("noise")
    config = f"--config={ROOT / 'tests/tasks/linreg.yaml'}"
    for nproc, micro in ((2, 128), (1, 64)):
        linreg = {
            f"{name}-{nproc}": (
                config,
                f"data.args={{sigma: {sigma}}}",
                f"model.args={{delta: {delta}}}",
                f"batch.micro_size={micro}",
            )
            for name, (sigma, delta) in GROUND_TRUTH.items()
        }
        common = (
            {"two": (*COMMON, "train.noise_scale=true")}
            if nproc == 2
            else {"one": (*ACCUMULATED, "train.noise_scale=true"), "plain": ACCUMULATED}
        )
        train_in_one_job(base, {**linreg, **common}, nproc=nproc)
    return base


def test_two_ranks_and_one_rank_with_accumulation_measure_a_consistent_noise_scale(runs: Path):
    two, one, plain = runs / "two", runs / "one", runs / "plain"
    assert all("gns/trace" in r for r in metrics(two) + metrics(one))  # every log step measured
    gns_two = [
        r["gns"] for r in metrics(two) if "gns" in r
    ]  # absent while the smoothed |G|² is still ≤ 0
    gns_one = [r["gns"] for r in metrics(one) if "gns" in r]
    assert len(gns_two) >= 25 and len(gns_one) >= 25 and all(g > 0 for g in gns_two + gns_one)
    assert 0.5 < statistics.median(gns_two[-15:]) / statistics.median(gns_one[-15:]) < 2.0
    # measuring does not change training
    assert [r["loss"] for r in metrics(one)] == [r["loss"] for r in metrics(plain)]


def test_noise_scale_without_two_batch_sizes_is_a_one_line_error():
    result = cli_in_process("train", "train.noise_scale=true")
    assert result.returncode == 2 and "train.noise_scale compares two batch sizes" in result.stderr


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_bench_gns_prints_both_rates_and_their_ratio(engine: str):
    result = (
        cli_in_process(  # its workers are real processes under torchrun; the launcher runs here
            "bench", "gns", "--engine", engine, "--steps", "1", "--repeats", "1", "data.size=1024"
        )
    )
    assert result.returncode == 0, result.stderr
    assert f", engine {engine}, 2 processes" in result.stdout
    rates = re.findall(r"^noise scale (?:off|every step)\s+(\d+)$", result.stdout, re.M)
    assert len(rates) == 2 and all(int(rate) > 0 for rate in rates)
    assert re.search(r"^ratio on / off = \d+\.\d{3} \(goal ≥ 0\.98\)$", result.stdout, re.M)


@pytest.mark.parametrize("nproc", [2, 1])
@pytest.mark.parametrize("name", list(GROUND_TRUTH))
def test_the_measured_noise_scale_is_the_true_one_within_10_percent(
    runs: Path, name: str, nproc: int
) -> None:
    """Ground truth the trainer does not compute: linear regression at a fixed w, whose simple noise scale is
    d·(1 + σ²/|w − w*|²) + 1. The in-training estimate (|G|² and tr Σ averaged over the run's steps, past the first
    20) is within 10 % of it, measured across ranks and across micro-batches alike."""
    from tasks.linreg import simple_noise_scale

    records = [r for r in metrics(runs / f"{name}-{nproc}") if "gns/trace" in r][20:]
    assert len(records) >= 300
    measured = statistics.mean(r["gns/trace"] for r in records) / statistics.mean(
        r["gns/grad_sq"] for r in records
    )
    assert measured == pytest.approx(simple_noise_scale(*GROUND_TRUTH[name]), rel=0.10)


CADENCE_LINREG = (
    f"--config={ROOT / 'tests/tasks/linreg.yaml'}",
    "data.args={sigma: 2.0, size: 2048}",
    "optim.lr=0.05",
    "batch.global_size=96",
    "batch.micro_size=8",
)
"""Linear regression on 3 processes, where dividing the gradients by 3 before or after their sum rounds differently."""


@pytest.fixture(scope="module")
def cadence_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In one 3-process job: a gns run (batch 24 → 96 in quanta of 3 × 8, the noise scale measured on every step)
    and a noise-measuring constant run, each at two log cadences, a constant run measuring every 3rd step, one not
    measuring at all, and a model with dropout evaluated at the end only or every 2nd step."""
    base = tmp_path_factory.mktemp("cadence")
    gns = (*CADENCE_LINREG, "batch.schedule=gns", "batch.start_size=24", "train.steps=8")
    measuring = (*CADENCE_LINREG, "train.steps=12")
    train_in_one_job(
        base,
        {
            "gns-log1": (*gns, "train.log_every=1"),
            "gns-log4": (*gns, "train.log_every=4"),
            "measure-log1": (*measuring, "train.log_every=1"),
            "measure-log4": (*measuring, "train.log_every=4"),
            "measure-every3": (*measuring, "train.log_every=4", "train.noise_every=3"),
            "plain": (*measuring, "train.noise_scale=false"),
            **{
                f"dropout-eval{every}": (
                    *measuring,
                    "model.name=linreg:dropout_model",
                    "model.args={delta: 1.0, p: 0.5}",
                    "train.noise_scale=false",
                    f"train.eval_every={every}",
                )
                for every in (0, 2)
            },
        },
        nproc=3,
    )
    return base


def _derived(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())["derived"]


def _sha(run: Path) -> str:
    return json.loads((run / "summary.json").read_text())["params_sha256"]


def test_log_every_does_not_change_a_gns_run(cadence_runs: Path):
    """The batch follows a noise scale measured on its own cadence (every step under gns), not on log steps."""
    assert _derived(cadence_runs / "gns-log4")["noise_every"] == 1
    sizes = [r["global_batch"] for r in metrics(cadence_runs / "gns-log1")]
    assert sizes[0] == 24 and len(set(sizes)) > 1
    assert _sha(cadence_runs / "gns-log1") == _sha(cadence_runs / "gns-log4")


def test_measuring_the_noise_scale_leaves_the_gradients_bit_identical_on_three_processes(
    cadence_runs: Path,
):
    """DDP's comm hook takes each bucket's local norm and reduces it as DDP does without one, so neither the log
    cadence, nor the measuring cadence, nor measuring at all changes the parameters."""
    assert _derived(cadence_runs / "measure-log4")["noise_every"] == 4
    assert all("gns/trace" in r for r in metrics(cadence_runs / "measure-log4"))
    shas = {
        _sha(cadence_runs / name) for name in ("measure-log1", "measure-log4", "measure-every3")
    }
    assert shas == {_sha(cadence_runs / "plain")}


def test_eval_every_does_not_change_a_run_with_dropout(cadence_runs: Path):
    """Evaluation reads its data through its own generator, so the dropout masks training draws stay the same."""
    assert _sha(cadence_runs / "dropout-eval0") == _sha(cadence_runs / "dropout-eval2")


def test_noise_every_without_the_noise_scale_is_a_one_line_error():
    result = cli_in_process("train", "train.noise_every=5")
    assert result.returncode == 2
    assert "train.noise_every=5 sets how often the noise scale is measured" in result.stderr
