"""Normalisation layers chosen by `model.norm`, so the same model runs with BN, GN, LN or none."""

from __future__ import annotations

from torch import nn

from largebatch.errors import UserError


def _groups(channels: int, least: int = 1) -> int:
    """Largest group count ≤ 32 that divides `channels` into groups of at least `least` channels (Wu & He 2018 use
    32)."""
    return max(
        g for g in range(1, min(32, channels) + 1) if channels % g == 0 and channels // g >= least
    )


def norm1d(kind: str, features: int) -> nn.Module:
    """For (batch, features) inputs. GroupNorm and LayerNorm normalise over features only (no spatial extent), so
    each group takes at least 2 features: a group of one always normalises to 0, a constant layer."""
    if kind in ("group", "layer") and features < 2:
        raise UserError(
            f"model.norm={kind} normalises each example over its features, and model.width={features} leaves one "
            f"feature per group, which normalises to a constant; set model.width ≥ 2, or model.norm=batch or none"
        )
    return {
        "batch": lambda: nn.BatchNorm1d(features),
        "group": lambda: nn.GroupNorm(_groups(features, least=2), features),
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
