"""A user model by name for image data of any shape: flatten, one hidden layer (tests/test_config_overrides.py)."""

from __future__ import annotations

from torch import nn


def build(hidden: int = 32, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.LazyLinear(hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )
