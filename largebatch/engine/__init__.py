"""Engines: what differs by parallelism, behind one object the trainer does not branch on (`Engine`, in base.py).

`engines()` maps `engine.name` to its class: DDP, DeepSpeed ZeRO and torch FSDP2. Adding one is a module with an
`Engine` subclass (its capabilities declared in `features` terms) and a line here.
"""

from __future__ import annotations

from largebatch.engine.base import Engine

__all__ = ["Engine", "engines"]


def engines() -> dict[str, type[Engine]]:
    from largebatch.engine.ddp import DDPEngine
    from largebatch.engine.deepspeed import DeepSpeedEngine
    from largebatch.engine.fsdp import FSDPEngine

    return {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine, "fsdp": FSDPEngine}
