"""The value rules of the optimizers' arguments, one owner for the config layer (`optim.*` keys) and the
optimizer classes (LARS, LAMB), so the two never drift. Torch-free: config.validate runs it before torch loads.

A rule breaks as one line naming the value and the fix, e.g. "optim.betas=[0.9, 1.0] must be two numbers in
[0, 1), e.g. [0.9, 0.999]" from the config ("optim." prefix), the same without the prefix from the classes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from largebatch.errors import UserError


class OptimArgError(UserError, ValueError):
    """A value outside its rule: a UserError for the CLI (one line, exit 2), a ValueError for Python callers, as
    torch's own optimizers raise."""


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: v > 0, "must be positive"),
    "momentum": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.9"),
    "betas": (
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v),
        "must be two numbers in [0, 1), e.g. [0.9, 0.999]",
    ),
    "eps": (lambda v: v >= 0, "must not be negative"),
    "weight_decay": (lambda v: v >= 0, "must not be negative"),
    "trust_coefficient": (lambda v: v > 0, "must be positive"),
    "trust_clip": (lambda v: v is None or v > 0, "must be positive (or unset: no clamp)"),
}
"""Argument name → (holds, what the value must be)."""


def check(prefix: str = "", nesterov: bool = False, **values: Any) -> None:
    """Raise OptimArgError on the first value in `values` (argument name → value, names from RULES) that breaks its
    rule, or on `nesterov` without momentum; `prefix` ("optim.") names config keys. NaN breaks every rule."""
    for name, value in values.items():
        holds, says = RULES[name]
        shown = list(value) if name == "betas" else value
        if not holds(shown):
            raise OptimArgError(f"{prefix}{name}={shown} {says}")
    if nesterov and values.get("momentum") == 0:
        raise OptimArgError(f"{prefix}nesterov=true needs {prefix}momentum > 0")


def check_positive_eps(optimizer: str, eps: float, prefix: str = "") -> None:
    """Adam-style optimizers divide by √v + eps, where eps=0 can give 0/0; LARS adds eps to ‖g‖ only where ‖g‖ > 0."""
    if eps == 0:
        raise OptimArgError(
            f"{prefix}eps=0 must be positive for {optimizer} (it keeps √v + eps away from 0), e.g. 1e-8"
        )
