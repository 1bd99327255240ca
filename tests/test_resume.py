"""Resuming with changed settings: applied from the resumed step on and reported, never silent, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import cli_in_one_process, metrics
from torch import nn

from largebatch.optim.state import load_named_state_dict, named_state_dict

SGD = (
    "data.size=1024",
    "data.shape=[16]",
    "model.width=32",
    "batch.global_size=32",
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "optim.scaling=none",
    "train.steps=20",
    "train.log_every=1",
    "train.checkpoint_every=10",
)


def _stopped_at_10(full, dst):
    """A copy of a finished run directory as if it had died right after checkpointing step 10."""
    shutil.copytree(full, dst)
    (dst / "summary.json").unlink()
    shutil.rmtree(dst / "checkpoints/step_00000020")
    return dst


GNS = (
    "data.size=1024",
    "data.shape=[16]",
    "model.width=32",
    "batch.global_size=64",
    "batch.micro_size=16",
    "train.steps=20",
    "train.log_every=2",
    "train.checkpoint_every=10",
    "train.noise_scale=true",
)
CHANGES = {
    "changed": ("optim.lr=0.5", "optim.weight_decay=0.1", "optim.momentum=0.5"),
    "train.precision=fp16": ("train.precision=fp16",),
    "optim.exclude_1d=false": ("optim.exclude_1d=false",),
}
"""Each resume of the SGD run stopped at 10, with the settings it changes."""


def _train(run_dir: Path, *overrides: str) -> tuple[str, ...]:
    return ("train", f"run.dir={run_dir}", "logging.progress=false", *overrides)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """The SGD and noise-scale runs in one interpreter, then each resume of a copy stopped at step 10 in another:
    (directory, {resume: its CLI result})."""
    base = tmp_path_factory.mktemp("resume")
    first = cli_in_one_process(_train(base / "sgd", *SGD), _train(base / "gns", *GNS))
    assert all(r.returncode == 0 for r in first), [r.stderr[-2000:] for r in first]
    commands = {}
    for name, change in CHANGES.items():
        commands[name] = _train(_stopped_at_10(base / "sgd", base / name), *SGD, *change)
    commands["gns_resumed"] = _train(_stopped_at_10(base / "gns", base / "gns_resumed"), *GNS)
    return base, dict(zip(commands, cli_in_one_process(*commands.values())))


def test_changed_optimizer_settings_on_resume_are_applied_and_reported_in_one_line(resumed):
    base, results = resumed
    run, result = base / "changed", results["changed"]
    assert result.returncode == 0, result.stderr
    warnings = [
        line for line in result.stderr.splitlines() if line.startswith("largebatch: warning:")
    ]
    assert len(warnings) == 1
    for change in (
        "optim.lr 0.1 → 0.5",
        "optim.weight_decay 0.0 → 0.1",
        "optim.momentum 0.9 → 0.5",
    ):
        assert change in warnings[0]
    assert [r["lr"] for r in metrics(run) if r["step"] > 10] == [0.5] * 10


def test_the_optimizer_state_loads_by_name_and_keeps_this_runs_hyperparameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4)).sum().backward()
    before.step()
    saved = named_state_dict(model, before)
    regrouped = [
        {"params": [model[1].weight, model[0].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0},
    ]
    after = torch.optim.SGD(regrouped, lr=0.5, momentum=0.5)
    load_named_state_dict(model, after, saved)
    assert [(g["lr"], g["momentum"], g["weight_decay"]) for g in after.param_groups] == [
        (0.5, 0.5, 0.1),
        (0.5, 0.5, 0.0),
    ]
    for p in model.parameters():
        torch.testing.assert_close(
            after.state[p]["momentum_buffer"], before.state[p]["momentum_buffer"], rtol=0, atol=0
        )


@pytest.mark.parametrize(
    "change, reported",
    [
        ("train.precision=fp16", "train.precision fp32 → fp16"),
        ("optim.exclude_1d=false", "optim.exclude_1d True → False"),
    ],
)
def test_a_resume_with_another_precision_or_parameter_grouping_continues(resumed, change, reported):
    base, results = resumed
    run, result = base / change, results[change]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert reported in result.stderr
    assert [r["step"] for r in metrics(run)] == list(range(1, 21))


def test_the_noise_scale_averages_continue_across_a_resume(resumed):
    base, results = resumed
    assert results["gns_resumed"].returncode == 0, results["gns_resumed"].stderr
    uninterrupted = {r["step"]: r["gns"] for r in metrics(base / "gns") if "gns" in r}
    continued = {r["step"]: r["gns"] for r in metrics(base / "gns_resumed") if "gns" in r}
    assert uninterrupted.keys() == continued.keys() and 12 in continued
    assert continued == pytest.approx(uninterrupted, rel=1e-9)
