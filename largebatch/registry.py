"""The registries: every dataset, model, engine, LR schedule and batch schedule by name, with the config keys it
uses, its own config checks and where its code is.

An entry is a light declaration: its code (`module:attribute`) is imported on first use, so validating a config
imports no torch. Adding a dataset, model, engine or schedule is its code in one file plus one entry here; config.py
asks these tables which keys a name uses (to reject or reset the ones it ignores) and runs the chosen entries' checks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from largebatch.errors import UserError, check_choice

if TYPE_CHECKING:
    from largebatch.config import Config

FACTORY = "pkg.module:callable"
"""The entry every user factory (data.name, model.name) falls under."""


@dataclass(frozen=True)
class Entry:
    """One registered name."""

    name: str
    keys: tuple[str, ...] = ()
    """The `section.key`s it uses; the other keys its registry's entries list are ignored while it is chosen."""
    checks: tuple[Callable[[Config], None], ...] = ()
    """Config checks of its keys (raise UserError), run when it is chosen; torch-free."""
    code: str | None = None
    """`module:attribute` of its code: a builder, a class or a function (None: the caller handles the name)."""

    def module(self) -> ModuleType:
        """The module of its code, imported on first use."""
        return importlib.import_module(self.code.partition(":")[0])

    def load(self) -> Any:
        """The attribute `code` names."""
        return getattr(self.module(), self.code.partition(":")[2])


def _table(*entries: Entry) -> dict[str, Entry]:
    return {entry.name: entry for entry in entries}


def _synthetic(cfg: Config) -> None:
    if cfg.data.classes < 2:
        raise UserError(f"data.classes={cfg.data.classes} must be at least 2")
    if not cfg.data.shape or any(d < 1 for d in cfg.data.shape):
        raise UserError(
            f"data.shape={cfg.data.shape} must be a non-empty list of positive sizes, e.g. [32]"
        )


def _tokens(cfg: Config) -> None:
    check_choice("data.dtype", cfg.data.dtype, ("uint16", "uint32"))


DATASETS = _table(
    Entry(
        "synthetic",
        ("data.size", "data.eval_size", "data.shape", "data.classes", "data.label_noise"),
        (_synthetic,),
        "largebatch.data.synthetic:build",
    ),
    Entry("digits", ("data.eval_fraction",), code="largebatch.data.digits:build"),
    Entry("text", ("data.eval_fraction", "data.context"), code="largebatch.data.text:build"),
    Entry(
        "imagefolder",
        ("data.path", "data.eval_fraction", "data.image_size"),
        code="largebatch.data.imagefolder:build",
    ),
    Entry(
        "tokens",
        ("data.path", "data.eval_fraction", "data.context", "data.dtype", "data.stride"),
        (_tokens,),
        "largebatch.data.tokens:build",
    ),
    Entry(
        "jsonl",
        ("data.path", "data.eval_fraction", "data.context", "data.tokenizer", "data.text_key"),
        code="largebatch.data.jsonl:build",
    ),
    Entry(FACTORY, ("data.args", "data.eval_fraction")),
)
"""data.name: the built-in datasets (code: a builder taking its keys as keyword arguments, plus `seed` and
`ignore_index` if it asks for them, returning a `Data`), and the user's own."""


def _norm(cfg: Config) -> None:
    check_choice("model.norm", cfg.model.norm, ("batch", "syncbatch", "group", "layer", "none"))


MODELS = _table(
    Entry(
        "mlp", ("model.norm", "model.width", "model.depth"), (_norm,), "largebatch.models.mlp:build"
    ),
    Entry(
        "resnet",
        ("model.norm", "model.width", "model.depth"),
        (_norm,),
        "largebatch.models.resnet:build",
    ),
    Entry("gpt", ("model.heads", "model.width", "model.depth"), code="largebatch.models.gpt:build"),
    Entry("torchvision:<name>", ("model.args",)),
    Entry("hf:<name-or-dir>", ("model.args",)),
    Entry(FACTORY, ("model.args",)),
)
"""model.name: the built-in families (code: a builder taking the data's input shape and class count, then its keys
as keyword arguments; its module's CHECKPOINT_BLOCKS, if any, are what model.grad_checkpointing wraps), the hub
prefixes (an entry named `prefix:<...>` takes every name starting with `prefix:`) and the user's own."""


def _deepspeed(cfg: Config) -> None:
    check_choice("engine.offload", cfg.engine.offload, ("none", "cpu"))
    if cfg.engine.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"engine.zero_stage={cfg.engine.zero_stage} must be 0, 1, 2 or 3")


ENGINES = _table(
    Entry("ddp", code="largebatch.engine.ddp:DDPEngine"),
    Entry(
        "deepspeed",
        ("engine.zero_stage", "engine.offload", "engine.ds_config"),
        (_deepspeed,),
        "largebatch.engine.deepspeed:DeepSpeedEngine",
    ),
    Entry("fsdp", ("engine.shard_blocks",), code="largebatch.engine.fsdp:FSDPEngine"),
)
"""engine.name: code is the engine class (largebatch.engine.Engine)."""


def _step(cfg: Config) -> None:
    if not 0 < cfg.schedule.gamma <= 1:
        raise UserError(
            f"schedule.gamma={cfg.schedule.gamma} must be a decay factor in (0, 1], e.g. 0.1"
        )
    milestones = cfg.schedule.milestones
    if any(not 0 < m < 1 for m in milestones) or milestones != sorted(milestones):
        raise UserError(
            f"schedule.milestones={milestones} must be increasing fractions of training in (0, 1)"
        )


LR_SCHEDULES = _table(
    Entry("constant", code="largebatch.optim.schedules:constant"),
    Entry("cosine", ("schedule.min_lr_ratio",), code="largebatch.optim.schedules:cosine"),
    Entry(
        "step",
        ("schedule.milestones", "schedule.gamma"),
        (_step,),
        "largebatch.optim.schedules:step_wise",
    ),
    Entry(
        "poly", ("schedule.min_lr_ratio", "schedule.power"), code="largebatch.optim.schedules:poly"
    ),
)
"""schedule.name: code is the decay after warmup, `(cfg, step, total_steps, progress) -> LR factor`."""


def _gns(cfg: Config) -> None:
    if not cfg.train.noise_scale:
        raise UserError(
            "batch.schedule=gns follows the measured noise scale: set train.noise_scale=true"
        )


FIXED_TOKENS = ("text", "tokens")
"""data.name values whose every example holds data.context tokens (batch.threshold_unit=tokens converts by it)."""


def _steps(cfg: Config) -> None:
    if not cfg.batch.thresholds:
        raise UserError(
            "batch.schedule=steps needs batch.thresholds, the global batch from each count of examples on, "
            "e.g. '0:64 200k:128 1M:256'"
        )
    check_choice("batch.threshold_unit", cfg.batch.threshold_unit, ("examples", "tokens"))
    if cfg.batch.threshold_unit == "tokens" and cfg.data.name not in FIXED_TOKENS:
        raise UserError(
            f"batch.threshold_unit=tokens needs a fixed number of tokens per example (data.name=text or "
            f"tokens: data.context each), which data.name={cfg.data.name} has not; give batch.thresholds "
            f"in examples"
        )


BATCH_SCHEDULES = _table(
    Entry("constant", code="largebatch.batch_schedule:Constant"),
    Entry(
        "ramp", ("batch.start_size", "batch.ramp_samples"), code="largebatch.batch_schedule:Ramp"
    ),
    Entry("gns", ("batch.start_size",), (_gns,), "largebatch.batch_schedule:FollowNoise"),
    Entry(
        "steps",
        ("batch.thresholds", "batch.threshold_unit"),
        (_steps,),
        "largebatch.batch_schedule:Steps",
    ),
)
"""batch.schedule: code is the schedule class, built by its `of(cfg, final, quantum)`."""

REGISTRIES: dict[str, dict[str, Entry]] = {
    "data.name": DATASETS,
    "model.name": MODELS,
    "batch.schedule": BATCH_SCHEDULES,
    "schedule.name": LR_SCHEDULES,
    "engine.name": ENGINES,
}
"""The registry each deciding config key chooses from."""


TORCH_OPTIMIZER_CLASS = "torch_optimizer:<Class>"
"""How OPTIMIZER_OPTIONS names every torch_optimizer:<Class> optimizer."""
OPTIMIZER_OPTIONS: dict[str, tuple[str, ...]] = {
    "momentum": ("sgd", "lars", "larc"),
    "nesterov": ("sgd", "lars", "larc"),
    "betas": ("adamw", "lamb", "lambc", "muon"),
    "eps": ("adamw", "lars", "larc", "lamb", "lambc", "muon"),
    "trust_coefficient": ("lars", "larc"),
    "trust_clip": ("lamb", "lambc"),
    "bias_correction": ("lamb", "lambc"),
    "impl": ("lars", "larc", "lamb", "lambc"),
    "options": (TORCH_OPTIMIZER_CLASS, "muon"),
    "scale_weight_decay": ("adamw", "lamb", "lambc", "muon"),
}
"""optim.* keys that only some optimizers use, and which; every optimizer uses the other keys (lr,
reference_batch, scaling, weight_decay, exclude_1d, exclude). scale_weight_decay: the optimizers whose decay is
decoupled from the gradient, p·(1 − η·λ) per step (LAMB's scaled by the trust ratio, as its update is; Muon's with
the unadjusted lr); sgd, lars and larc add λ·p to the gradient, where momentum and LARS's trust ratio
(‖p‖/(‖g‖ + λ‖p‖)) reshape it."""

POSITIVE_EPS = ("adamw", "lamb", "lambc", "muon")
"""Optimizers that divide by √v + eps (optim_args.check_positive_eps)."""


def optimizer_family(name: str) -> str:
    """The name OPTIMIZER_OPTIONS knows `name` by (every torch_optimizer:<Class> by one)."""
    return TORCH_OPTIMIZER_CLASS if name.startswith("torch_optimizer:") else name
