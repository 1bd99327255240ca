"""Gradient checkpointing: blocks recompute their activations in backward instead of storing them."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Checkpointed(nn.Module):
    """Runs `block` under non-reentrant `torch.utils.checkpoint` while training (works with DDP, accumulation, AMP)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


def apply(model: nn.Module, block_types: tuple[type[nn.Module], ...], every: int) -> int:
    """Wrap every `every`-th block (in model order) of the given types; returns how many were wrapped."""
    blocks = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, block_types)
    ]
    chosen = blocks[every - 1 :: every]
    for parent, name in chosen:
        setattr(parent, name, Checkpointed(getattr(parent, name)))
    return len(chosen)
