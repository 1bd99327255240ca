"""Optimizer state keyed by parameter name, with hyperparameters always taken from the running config.

torch's `Optimizer.state_dict()` numbers parameters by their position in the param groups and carries the
groups' hyperparameters, so loading it restores the checkpoint's lr, weight decay and momentum over the
config's, and fails when the groups change (another `optim.exclude`). Keyed by name, as
`torch.distributed.checkpoint.state_dict` does, a resume keeps every parameter's moments and applies the
config's settings; `job` reports which settings changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _ordered_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def named_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Per-parameter optimizer state (moments, step counts, trust ratios) by parameter name."""
    state = optimizer.state_dict()["state"]
    return {name: state[i] for i, name in enumerate(_ordered_names(model, optimizer)) if i in state}


def load_named_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Load `named_state_dict` output into `optimizer`, keeping its own param groups and hyperparameters."""
    current = optimizer.state_dict()
    index = {name: i for i, name in enumerate(_ordered_names(model, optimizer))}
    current["state"] = {index[name]: value for name, value in saved.items() if name in index}
    optimizer.load_state_dict(current)
