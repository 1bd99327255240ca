"""batch.micro_size=auto: the micro-batch adapts to memory, the global batch and the examples per step never change."""

from __future__ import annotations

import pytest
import torch
from conftest import cli, cli_in_process, metrics, train_in_one_job
from torch import nn

from largebatch.autobatch import InjectedOutOfMemory, smaller
from largebatch.batch import plan

COMMON = (
    "data.size=1024",
    "data.shape=[16]",
    "model.width=64",
    "batch.global_size=64",
    "optim.lr=0.1",
    "optim.scaling=none",
    "train.steps=12",
    "train.log_every=1",
    "logging.progress=false",
)


INJECT = {"LARGEBATCH_INJECT_OOM_AT_STEP": "5"}
RUNS = {
    "fixed": ("batch.micro_size=32",),
    "auto": ("batch.micro_size=auto", "batch.memory_limit=80KiB"),
    "shrink": ("batch.micro_size=auto",),
    "shrink_accum": ("batch.micro_size=auto", "batch.memory_limit=80KiB"),
}
"""The 2-process trainings, all in one torchrun job; the shrink runs with INJECT set while they train."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each of RUNS trained into base/<name>, and the stderr the job wrote while it trained."""
    base = tmp_path_factory.mktemp("autobatch")
    stderr = train_in_one_job(
        base,
        {name: (*COMMON, *args) for name, args in RUNS.items()},
        env={"shrink": INJECT, "shrink_accum": INJECT},
    )
    return {name: (base / name, stderr[name]) for name in RUNS}


def _assert_same_losses(a, b):
    for x, y in zip(metrics(a), metrics(b), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def fixed_run(runs):
    run = runs["fixed"][0]
    assert {r["micro_batch"] for r in metrics(run)} == {32}
    return run


def test_auto_under_a_memory_budget_picks_a_smaller_micro_batch_and_trains_identically(
    fixed_run, runs
):
    run = runs["auto"][0]
    micro = {r["micro_batch"] for r in metrics(run)}
    assert len(micro) == 1 and micro.pop() < 32
    _assert_same_losses(run, fixed_run)


def test_an_out_of_memory_mid_run_halves_the_micro_batch_on_all_ranks_and_redoes_the_step(
    fixed_run, runs
):
    run, stderr = runs["shrink"]
    assert [(r["micro_batch"], r["accum_steps"]) for r in metrics(run)] == [(32, 1)] * 4 + [
        (16, 2)
    ] * 8
    assert stderr.count("out of memory at step 5 with micro-batch 32") == 1
    _assert_same_losses(run, fixed_run)


def test_the_next_smaller_micro_batch_divides_the_per_rank_share():
    assert smaller(plan(2, 96, 48)).micro_batch == 24
    assert smaller(plan(1, 12, 12)).micro_batch == 6
    assert smaller(plan(1, 10, 5)).micro_batch == 2
    assert smaller(plan(1, 4, 1)) is None


def _micro_steps(seam: InjectedOutOfMemory, model: nn.Module, *steps: tuple[int, bool]) -> None:
    for step, last in steps:
        seam.arm(step, last)
        model(torch.ones(3, 4)).sum().backward()


def test_the_injected_out_of_memory_fires_once_inside_the_backward_of_the_chosen_step(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_INJECT_OOM_AT_STEP", "2")
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    seam = InjectedOutOfMemory(model, rank=0)
    _micro_steps(seam, model, (1, True), (2, False))  # another step; not the step's last micro-step
    seam.arm(2, True)
    loss = model(torch.ones(3, 4)).sum()  # the forward passes
    with pytest.raises(torch.OutOfMemoryError, match="in the backward of Linear"):
        loss.backward()
    _micro_steps(seam, model, (2, True))  # the redone step passes


def test_the_injected_out_of_memory_spares_the_other_ranks(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_INJECT_OOM_AT_STEP", "1")
    monkeypatch.setenv("LARGEBATCH_INJECT_OOM_RANK", "1")
    model = nn.Linear(4, 1)
    _micro_steps(InjectedOutOfMemory(model, rank=0), model, (1, True))


REAL_PROCESS = "derives batch.accum_steps"
"""The case that runs as a real process (its exit code); the others end in this one, before any process group."""


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("batch.micro_size=auto", "batch.accum_steps=2"), "derives batch.accum_steps"),
        (("batch.micro_size=big",), "batch.micro_size='big' is not one of auto"),
        (("batch.micro_size=auto", "batch.memory_limit=2G"), "must be a size with a unit"),
    ],
)
def test_bad_auto_settings_are_one_line_errors(overrides, message):
    run = cli if message == REAL_PROCESS else cli_in_process
    result = run("train", *overrides)
    assert (
        result.returncode == 2
        and message in result.stderr
        and len(result.stderr.strip().splitlines()) == 1
    )


def test_an_out_of_memory_redo_with_accumulation_counts_the_step_loss_once(fixed_run, runs):
    run = runs["shrink_accum"][0]
    assert metrics(run)[4]["accum_steps"] > 2
    _assert_same_losses(run, fixed_run)


def test_noise_scale_with_auto_on_one_process_keeps_a_smaller_batch_to_compare(run_dirs):
    run = run_dirs("auto_gns")
    result = cli(
        "train",
        f"run.dir={run}",
        *COMMON,
        "batch.micro_size=auto",
        "train.noise_scale=true",
        "train.log_every=2",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = metrics(run)
    assert {r["micro_batch"] for r in records} == {32}
    assert all("gns" in r for r in records if r["step"] % 2 == 0)
