"""The features an engine may support, and how an engine declares its support: one table, from which its `check`
refuses a job before any process group starts and docs/engines-matrix.md is generated (`largebatch.engine.matrix`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from largebatch.config import Config
from largebatch.errors import UserError

if TYPE_CHECKING:
    from largebatch.engine.base import Engine

LAYERWISE = ("lars", "larc", "lamb", "lambc")
"""Optimizers with a per-layer trust ratio (computed on whole parameters, whatever the sharding)."""


@dataclass(frozen=True)
class Feature:
    """One row of the matrix: a config key set to one of `values`."""

    id: str
    """How engines' `capabilities` and test ids name it."""
    key: str
    """The config key, `section.name`."""
    values: tuple[Any, ...] | None
    """The values that use the feature (None: any value set, e.g. a non-empty list)."""
    needs_cuda: bool = False
    """On every engine (checked where the model is built): supported cells read "CUDA only"."""

    @property
    def name(self) -> str:
        """The row as the docs write it: `train.noise_scale`, `optim.name: lars, lamb`."""
        if self.values in ((True,), None):
            return self.key
        return f"{self.key}: {', '.join(self.values)}"

    def setting(self, cfg: Config) -> str | None:
        """The setting as an error names it (`batch.schedule=gns`) where `cfg` uses the feature, else None."""
        section, field = self.key.split(".")
        value = getattr(getattr(cfg, section), field)
        if self.values is None:
            return self.key if value else None
        if value not in self.values:
            return None
        return self.key if value is True else f"{self.key}={value}"


FEATURES = (
    Feature("gns", "batch.schedule", ("gns",)),
    Feature("ramp", "batch.schedule", ("ramp",)),
    Feature("steps", "batch.schedule", ("steps",)),
    Feature("noise", "train.noise_scale", (True,)),
    Feature("cbs", "train.cbs_every", None),
    Feature("auto", "batch.micro_size", ("auto",)),
    Feature("bf16", "train.precision", ("bf16",)),
    Feature("fp16", "train.precision", ("fp16",)),
    Feature("layerwise", "optim.name", LAYERWISE),
    Feature("muon", "optim.name", ("muon",)),
    Feature("groups", "optim.groups", None),
    Feature("syncbatch", "model.norm", ("syncbatch",), needs_cuda=True),
    Feature("compile", "train.compile", None),
)
"""The rows, in the order `refuse` checks them (gns before the noise scale it needs: its refusal says more)."""


@dataclass(frozen=True)
class Cell:
    """How an engine (in one of its columns) supports one feature."""

    runs: str = "cpu"
    """cpu (on CPU and CUDA), cuda (CUDA only) or refused."""
    reason: str = ""
    """cuda, refused: what the one-line error says after the setting (why not, and what to use instead)."""
    gpu_test: str = ""
    """Where tests_gpu/ runs it on CUDA, for a cell that runs on CUDA only ("" = untested)."""


YES = Cell()
"""Runs on CPU and CUDA (tests/test_feature_matrix.py trains it on CPU)."""


def cuda_only(reason: str, gpu_test: str = "") -> Cell:
    return Cell("cuda", reason, gpu_test)


def refused(reason: str) -> Cell:
    return Cell("refused", reason)


def cell(engine: type[Engine], feature: Feature, column: int) -> Cell:
    """`engine`'s support of `feature` in its `column`-th column."""
    declared = engine.capabilities.get(feature.id, YES)
    return declared[column] if isinstance(declared, tuple) else declared


def refuse(engine: type[Engine], cfg: Config) -> None:
    """Raise UserError, one line, for the first feature `cfg` uses that `engine` refuses (or runs on CUDA only, here
    without CUDA)."""
    column = engine.column(cfg)
    for feature in FEATURES:
        setting = feature.setting(cfg)
        if setting is None:
            continue
        support = cell(engine, feature, column)
        if support.runs == "refused" or (support.runs == "cuda" and not torch.cuda.is_available()):
            raise UserError(f"{setting} {support.reason}")
