"""Model registry: each builder takes the model config, the input shape and the class count."""

from __future__ import annotations

from torch import nn

from largebatch.config import ModelConfig
from largebatch.errors import check_choice
from largebatch.models import mlp, resnet

BUILDERS = {"mlp": mlp, "resnet": resnet}


def check(cfg: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Fail before any process starts if the model is unknown or cannot take this input."""
    BUILDERS[check_choice("model.name", cfg.name, list(BUILDERS))].check(cfg, input_shape)


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    check(cfg, input_shape)
    return BUILDERS[cfg.name].build(cfg, input_shape, num_classes)
