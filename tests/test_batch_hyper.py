"""Hyperparameters that follow the global batch: optim.scaling=auto picks the LR rule by optimizer family, and
optim.scale_weight_decay keeps decoupled weight decay's timescale batch/(lr·weight_decay) at its reference value,
at start and at every batch-size change."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import cli_in_process
from torch import nn

import largebatch
from largebatch import optim
from largebatch.config import OptimConfig, ScheduleConfig
from largebatch.data import ArrayDataset
from largebatch.optim.hyper import Hyperparameters
from largebatch.optim.scaling import AUTO_RULES, peak_lr, scaling_rule, weight_decay_factor
from largebatch.optim.schedules import Schedule


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("sgd", "linear"),
        ("lars", "linear"),
        ("larc", "linear"),
        ("adamw", "sqrt"),
        ("lamb", "sqrt"),
        ("lambc", "sqrt"),
    ],
)
def test_auto_scaling_is_linear_for_the_sgd_family_and_sqrt_for_the_adam_family(name, rule):
    assert scaling_rule(OptimConfig(name=name, scaling="auto")) == rule


def test_an_explicit_scaling_rule_is_kept():
    assert scaling_rule(OptimConfig(name="adamw", scaling="linear")) == "linear"


def test_every_registered_optimizer_has_an_auto_scaling_rule():
    assert set(optim.OPTIMIZERS) <= set(AUTO_RULES)


@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
def test_scaled_weight_decay_keeps_batch_over_lr_times_decay_at_the_reference_value(rule):
    reference, lr, decay = 256, 1e-3, 0.1
    for batch in (64, 256, 1024, 4096):
        scaled = decay * weight_decay_factor(batch, reference, rule)
        timescale = batch / (peak_lr(lr, batch, reference, rule) * scaled)
        assert timescale == pytest.approx(reference / (lr * decay))


def test_weight_decay_stays_under_linear_grows_as_sqrt_under_sqrt_and_linearly_under_none():
    factors = [weight_decay_factor(1024, 256, rule) for rule in ("linear", "sqrt", "none")]
    assert factors == pytest.approx([1.0, 2.0, 4.0])


def _hyper(**optim_keys) -> Hyperparameters:
    """AdamW over a linear layer (its bias excluded from decay), batch.global_size 1024, reference 256."""
    cfg = OptimConfig(name="adamw", lr=1e-3, reference_batch=256, weight_decay=0.1, **optim_keys)
    optimizer = optim.build(nn.Linear(4, 2), cfg, peak_lr(cfg.lr, 1024, 256, scaling_rule(cfg)))
    return Hyperparameters(optimizer, cfg, Schedule(ScheduleConfig(), 10, 0), 1024)


def _values(hyper: Hyperparameters) -> list[float]:
    """lr, weight_decay of the decayed group, then of the excluded one."""
    return [g[key] for g in hyper.optimizer.param_groups for key in ("lr", "weight_decay")]


def test_weight_decay_and_lr_are_set_at_start_and_after_a_batch_change():
    hyper = _hyper(scaling="auto", scale_weight_decay=True)
    hyper.set(1024, 0)  # the start, at batch.global_size: sqrt(1024 / 256) = 2
    assert _values(hyper) == pytest.approx([2e-3, 0.2, 2e-3, 0.0])
    hyper.set(256, 1024)  # a ramp's step at the reference batch: the given values
    assert _values(hyper) == pytest.approx([1e-3, 0.1, 1e-3, 0.0])
    hyper.set(512, 2048)  # the next: both grow by sqrt(2), the excluded group's decay stays 0
    root2 = math.sqrt(2)
    assert _values(hyper) == pytest.approx([1e-3 * root2, 0.1 * root2, 1e-3 * root2, 0.0])


def test_weight_decay_is_left_as_given_without_scale_weight_decay():
    hyper = _hyper(scaling="sqrt")
    hyper.set(1024, 0)
    assert _values(hyper) == pytest.approx([2e-3, 0.1, 2e-3, 0.0])


def test_the_start_line_says_what_auto_chose_and_the_scaled_weight_decay():
    described = _hyper(scaling="auto", scale_weight_decay=True).describe()
    assert described.startswith("optim.scaling=auto → sqrt for adamw (Adam family")
    assert (
        "optim.lr 0.001 at reference 256 → 0.002 at global 1024 (optim.scaling=sqrt)" in described
    )
    assert "weight decay 0.1 at reference 256 → 0.2 at global 1024" in described


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optim.scale_weight_decay=true"],
            "optim.scale_weight_decay is ignored with optim.name=sgd (only adamw, lamb, lambc and muon use it)",
        ),
        (
            ["optim.name=lars", "optim.scale_weight_decay=true"],
            "optim.scale_weight_decay is ignored with optim.name=lars",
        ),
        (
            ["optim.name=torch_optimizer:Lamb", "optim.scaling=auto"],
            "optim.scaling=auto picks linear for sgd, lars, larc and sqrt for adamw, lamb, lambc, muon; "
            "for optim.name=torch_optimizer:Lamb set optim.scaling to linear, sqrt or none",
        ),
    ],
    ids=["sgd_decay", "lars_decay", "torch_optimizer_auto"],
)
def test_a_refused_combination_is_one_line_and_exit_2(overrides, message):
    result = cli_in_process("plan", "--examples", "1000", *overrides)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("largebatch: error: ") and message in lines[0]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_ramp_run_decays_with_the_scaled_weight_decay_of_each_step(tmp_path, capsys, engine):
    """With zero gradients AdamW only decays: w ← w·(1 − lr·λ) each step, so the final weight is the product over the
    steps of the LR and weight decay that the trainer set for each step's global batch (read from model.pt)."""
    model = nn.Linear(4, 1, bias=False)
    nn.init.ones_(model.weight)
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    summary = largebatch.train(
        None,
        [
            f"run.dir={run}",
            "logging.progress=false",
            "optim.name=adamw",
            "optim.lr=0.01",
            "optim.weight_decay=0.5",
            "optim.reference_batch=16",
            "optim.scaling=auto",
            "optim.scale_weight_decay=true",
            "batch.global_size=64",
            "batch.micro_size=16",
            "batch.schedule=ramp",
            "batch.start_size=16",
            "batch.ramp_samples=128",
            "train.steps=4",
            "train.log_every=1",
            f"engine.name={engine}",
        ],
        model=model,
        train_data=ArrayDataset(x, x[:, :1]),
        loss=lambda output, targets: ((output * 0).sum(), len(targets)),
    )
    out = capsys.readouterr().out
    assert "optim.scaling=auto → sqrt for adamw" in out
    assert "weight decay 0.5 at reference 16 → 1 at global 64" in out
    assert (
        "global batch 16 → 32" in out
        and "peak lr 0.01 → 0.0141421; weight decay 0.5 → 0.707107" in out
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    batches = [r["global_batch"] for r in records]
    assert batches[0] == 16 and batches[-1] == 64  # the ramp ran
    expected = 1.0
    for record in records:
        ratio = math.sqrt(record["global_batch"] / 16)
        assert record["lr"] == pytest.approx(0.01 * ratio)
        expected *= 1 - record["lr"] * 0.5 * ratio
    final = torch.load(run / "model.pt", weights_only=True)["weight"]
    assert final == pytest.approx(torch.full((1, 4), expected))
    derived = yaml.safe_load((run / "config.yaml").read_text())["derived"]
    assert derived["scaling"] == "sqrt" and derived["weight_decay"] == pytest.approx(1.0)
    assert summary["peak_lr"] == pytest.approx(0.02)
