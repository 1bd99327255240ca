"""Model registry: each builder takes the model config, the input shape and the class count."""

from __future__ import annotations

import dataclasses
import torch
from torch import nn

from largebatch.config import ModelConfig
from largebatch.errors import UserError, check_choice
from largebatch.models import checkpointing, gpt, mlp, resnet

BUILDERS = {"mlp": mlp, "resnet": resnet, "gpt": gpt}
BLOCKS: dict[str, tuple[type[nn.Module], ...]] = {"resnet": (resnet.BasicBlock,), "gpt": (gpt.Block,)}
"""What gradient checkpointing wraps, per model."""


def check(cfg: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Fail before any process starts if the model is unknown, cannot take this input or cannot honour an option."""
    BUILDERS[check_choice("model.name", cfg.name, list(BUILDERS))].check(cfg, input_shape)
    if cfg.grad_checkpointing and cfg.name not in BLOCKS:
        raise UserError(f"model.grad_checkpointing needs a model with blocks ({', '.join(BLOCKS)}), not {cfg.name}")
    if cfg.norm == "syncbatch" and not torch.cuda.is_available():
        raise UserError("model.norm=syncbatch needs CUDA (SyncBatchNorm runs on NCCL); use batch or group on CPU")


def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    check(cfg, input_shape)
    base = dataclasses.replace(cfg, norm="batch") if cfg.norm == "syncbatch" else cfg
    model = BUILDERS[cfg.name].build(base, input_shape, num_classes)
    if cfg.norm == "syncbatch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.grad_checkpointing:
        checkpointing.apply(model, BLOCKS[cfg.name], int(cfg.grad_checkpointing))
    return model
