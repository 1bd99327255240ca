"""A plain MLP: (Linear → norm → ReLU) × depth → Linear, on flattened inputs."""

from __future__ import annotations

import math

from torch import nn

from largebatch.models.norms import norm1d


def build(
    input_shape: tuple[int, ...], num_classes: int, width: int, depth: int, norm: str
) -> nn.Module:
    """Any input shape works: it is flattened."""
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(width_in, width), norm1d(norm, width), nn.ReLU()]
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)
