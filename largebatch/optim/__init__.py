"""Optimizer registry and parameter groups."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from largebatch.config import OptimConfig
from largebatch.errors import UserError, check_choice

ParamGroups = list[dict]


def param_groups(model: nn.Module, weight_decay: float) -> ParamGroups:
    """Biases and norm weights (ndim ≤ 1) get no weight decay and no layer-wise adaptation (Goyal et al. §5.1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def _sgd(groups: ParamGroups, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)


def _adamw(groups: ParamGroups, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


OPTIMIZERS: dict[str, Callable[[ParamGroups, OptimConfig, float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
}


def check(cfg: OptimConfig) -> None:
    check_choice("optim.name", cfg.name, list(OPTIMIZERS))
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("optim.nesterov=true needs optim.momentum > 0")


def build(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `model`'s parameter groups, starting at `lr`."""
    check(cfg)
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay), cfg, lr)
