"""Engines: what differs by parallelism, behind one object the trainer does not branch on (`Engine`, in base.py).

`engines()` maps `engine.name` to its class: DDP, DeepSpeed ZeRO and torch FSDP2 (`engine_class(name)` imports one
alone). Adding one is a module with an `Engine` subclass (its capabilities declared in `features` terms) and an
entry in `registry.ENGINES` (its config keys and checks).
"""

from __future__ import annotations

from largebatch.engine.base import Engine
from largebatch.registry import ENGINES

__all__ = ["Engine", "engine_class", "engines"]


def engines() -> dict[str, type[Engine]]:
    """{engine.name: its class}, from the registry (each imported here, on first use)."""
    return {name: entry.load() for name, entry in ENGINES.items()}


def engine_class(name: str) -> type[Engine]:
    """The class of `engine.name`, importing its module alone (FSDP's imports cost a job on DDP 0.15 s)."""
    return ENGINES[name].load()
