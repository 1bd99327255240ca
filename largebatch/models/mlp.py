"""A plain MLP: (Linear → norm → ReLU) × depth → Linear, on flattened inputs."""

from __future__ import annotations

import math

from torch import nn

from largebatch.config import ModelConfig
from largebatch.models.norms import norm1d


def check(cfg: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Any input shape works: it is flattened."""


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = math.prod(input_shape)
    for _ in range(cfg.depth):
        layers += [nn.Linear(width_in, cfg.width), norm1d(cfg.norm, cfg.width), nn.ReLU()]
        width_in = cfg.width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)
