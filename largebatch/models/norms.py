"""Normalisation layers chosen by `model.norm`, so the same model runs with BN, GN, LN or none."""

from __future__ import annotations

from torch import nn


def _groups(channels: int) -> int:
    """Largest group count ≤ 32 that divides `channels` (Wu & He 2018 use 32)."""
    return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


def norm1d(kind: str, features: int) -> nn.Module:
    return {
        "batch": lambda: nn.BatchNorm1d(features),
        "group": lambda: nn.GroupNorm(_groups(features), features),
        "layer": lambda: nn.LayerNorm(features),
        "none": nn.Identity,
    }[kind]()


def norm2d(kind: str, channels: int) -> nn.Module:
    return {
        "batch": lambda: nn.BatchNorm2d(channels),
        "group": lambda: nn.GroupNorm(_groups(channels), channels),
        "layer": lambda: nn.GroupNorm(1, channels),
        "none": nn.Identity,
    }[kind]()
