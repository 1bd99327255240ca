"""`largebatch.train(...)`: the Python entry point, on the same path as `largebatch train` (plan, checks, run
directory, checkpoints, wandb), alone or under torchrun."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from largebatch import config
from largebatch.errors import TrainingStopped, UserError


def train(
    config_or_path: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    train_data: Dataset | None = None,
    eval_data: Dataset | None = None,
    loss: Callable[[Any, Any], tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    """Train as `largebatch train` would, with Python objects in place of `model.name`, `data.name`, `train.loss`.

    `config_or_path`: a YAML file, a mapping of sections ({"batch": {"global_size": 1024}, ...}) or None (defaults);
    `overrides`: "section.key=value" strings. `model`: a module, or a builder called with `model.args` after seeding
    with `run.seed` (the same initial weights on every rank and topology, as from the CLI). `train_data`: a map-style
    Dataset of (inputs, targets) — without `eval_data`, `data.eval_fraction` of it is held out. `loss(output,
    targets)` → (sum of loss terms, number of terms). Returns the run's summary (as in summary.json). A user error
    prints one line and exits 2, as the CLI does; a stopped run exits with the CLI's code.
    """
    try:
        named = [
            f"{key}=python:{getattr(given, '__qualname__', type(given).__qualname__)}"
            for key, given in (
                ("model.name", model),
                ("data.name", train_data),
                ("train.loss", loss),
            )
            if given is not None
        ]
        cfg = config.load(config_or_path, [*named, *overrides])
        return run(cfg, model=model, train_data=train_data, eval_data=eval_data, loss=loss)
    except UserError as exc:
        _say(f"error: {exc}")
        raise SystemExit(2) from None
    except TrainingStopped as exc:
        _say(f"stopped: {exc}")
        raise SystemExit(exc.exit_code) from None


def run(cfg: config.Config, **objects: Any) -> dict[str, Any]:
    """Prepare (before any process group), join the group, train, leave it; returns rank's summary."""
    from largebatch import dist, job, task, trainer
    from largebatch.engine import engine_class

    info = dist.from_env()
    prepared = job.prepare(cfg, info.world_size, task=task.build(cfg, **objects))
    dist.init(info, engine_class(cfg.engine.name).needs_process_group)
    stopped = None
    try:
        summary = trainer.fit(prepared, info)
    except TrainingStopped as exc:
        stopped = exc.with_traceback(
            None
        )  # frees the trainer (and its DDP's hold on the group) before teardown
    # Every rank stopped at the same step, so all reach teardown's barrier. Not after an unexpected error: that rank
    # would wait in the barrier while the others wait in a collective.
    dist.teardown()
    if stopped is not None:
        raise stopped
    return summary


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"largebatch: {line}", file=sys.stderr)
