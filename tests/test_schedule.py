"""LR scaling rules and schedule values at known points."""

from __future__ import annotations

import math

import pytest

from largebatch.config import ScheduleConfig
from largebatch.optim.scaling import peak_lr
from largebatch.optim.schedules import Schedule


@pytest.mark.parametrize(
    "rule, expected", [("linear", 3.2), ("sqrt", 0.1 * math.sqrt(32)), ("none", 0.1)]
)
def test_scaling_rules_from_the_reference_batch(rule, expected):
    assert peak_lr(0.1, 8192, 256, rule) == pytest.approx(expected)


def test_goyal_resnet50_8k_peak_lr():
    assert peak_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2)


def test_warmup_is_linear_and_reaches_the_peak_at_its_last_step():
    s = Schedule(ScheduleConfig(name="constant"), total_steps=100, warmup_steps=10)
    assert [s.factor(i) for i in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])


def test_cosine_decays_from_peak_to_the_floor():
    s = Schedule(ScheduleConfig(name="cosine", min_lr_ratio=0.1), total_steps=110, warmup_steps=10)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.55)
    assert s.factor(110) == pytest.approx(0.1)


def test_poly_power_two_as_in_lars():
    s = Schedule(ScheduleConfig(name="poly", power=2.0), total_steps=100, warmup_steps=0)
    assert [s.factor(i) for i in (0, 50, 75)] == pytest.approx([1.0, 0.25, 0.0625])


def test_step_multiplies_by_gamma_at_each_milestone():
    s = Schedule(
        ScheduleConfig(name="step", milestones=[0.5, 0.75], gamma=0.1),
        total_steps=100,
        warmup_steps=5,
    )
    assert [s.factor(i) for i in (10, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
