"""Typed config: YAML sections + `section.key=value` overrides, validated before any process starts."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from largebatch import optim_args
from largebatch.errors import UserError, check_choice, warn
from largebatch.registry import FACTORY, OPTIMIZER_OPTIONS, REGISTRIES, optimizer_family


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory defaults to runs/<name>."""
    dir: str | None = None
    """Where config.yaml, metrics.jsonl and summary.json go."""
    seed: int = 0
    """Seeds model init, data order and random augmentations (per example, from seed, epoch and index)."""
    deterministic: bool = False
    """Turn on torch's deterministic algorithms (slower on some ops)."""
    resume: str = "auto"
    """auto (latest good checkpoint in run.dir, if any), never, or a checkpoint or run directory."""
    threads: int | None = None
    """CPU threads per process (torch intra-op); default OMP_NUM_THREADS if set, else usable cores ÷ processes on this
    node."""


@dataclass
class DataConfig:
    name: str = "synthetic"
    """Dataset: synthetic, digits or text (built in, nothing downloaded), imagefolder, tokens, jsonl, or your own
    pkg.module:callable."""
    args: dict = field(default_factory=dict)
    """pkg.module:callable: keyword arguments it is called with; it returns a Dataset or a (train, eval) pair."""
    path: str | None = None
    """imagefolder: folder of class sub-folders (or with train/ and val/); tokens: token file (or folder with
    train.bin, val.bin); jsonl: file."""
    seed: int = 0
    """Seeds data generation and the held-out split, independently of run.seed."""
    size: int = 8192
    """synthetic: training examples."""
    eval_size: int = 2048
    """synthetic: held-out examples."""
    shape: list[int] = field(default_factory=lambda: [32])
    """synthetic: shape of one input, e.g. [32] for vectors or [3, 16, 16] for images."""
    classes: int = 10
    """synthetic: number of classes."""
    label_noise: float = 0.0
    """synthetic: fraction of labels replaced by a random class."""
    eval_fraction: float = 0.2
    """digits, text, and data without its own held-out part: fraction held out for evaluation."""
    context: int = 64
    """text, tokens: tokens per example (the model's context length); jsonl: longest example, longer ones are cut."""
    image_size: int = 224
    """imagefolder: side of the square crop the model sees."""
    dtype: str = "uint16"
    """tokens: integer type of the token file: uint16 (vocabularies up to 65536, as nanoGPT writes) or uint32."""
    stride: int | None = None
    """tokens: tokens between the starts of consecutive examples (default data.context: no overlap)."""
    tokenizer: str = "bytes"
    """jsonl: bytes (UTF-8 bytes as tokens 0-255) or a local Hugging Face tokenizer directory."""
    text_key: str = "text"
    """jsonl: the field of each JSON line that holds the text."""
    workers: int = 0
    """DataLoader worker processes per rank (0: the main process fetches each micro-batch itself, without a
    DataLoader); results do not depend on it."""


@dataclass
class ModelConfig:
    name: str = "mlp"
    """Model: mlp, resnet (small ResNet for images), gpt (small causal transformer), torchvision:<name>, hf:<name-or-
    dir>, or your own pkg.module:callable."""
    args: dict = field(default_factory=dict)
    """torchvision:, hf: and pkg.module:callable models: keyword arguments of the builder (hf: config fields)."""
    norm: str = "none"
    """mlp, resnet: normalisation: batch, syncbatch (BatchNorm synchronised across ranks; CUDA only), group, layer or
    none."""
    width: int = 256
    """mlp: hidden units; resnet: channels of the first stage; gpt: embedding size."""
    depth: int = 2
    """mlp: hidden layers; resnet: residual blocks per stage; gpt: transformer blocks."""
    heads: int = 4
    """gpt: attention heads (must divide model.width)."""
    grad_checkpointing: bool | int = False
    """Recompute activations in backward: true for every block, N for every N-th (resnet, gpt)."""


@dataclass
class BatchConfig:
    global_size: int | None = 256
    """Examples per optimizer step over all processes (the number the science is about)."""
    micro_size: int | str | None = None
    """Examples per process per forward/backward; derived when unset; auto finds the largest that fits."""
    accum_steps: int | None = None
    """Micro-steps per optimizer step; derived, and must agree if given."""
    memory_limit: str | None = None
    """Per-process memory budget for micro_size=auto, e.g. 2GiB (default: the GPU's memory; none on CPU)."""
    schedule: str = "constant"
    """How the global batch changes: constant, ramp (linear in examples, Megatron-style), gns (follows the
    measured noise scale, AdaptDL-style) or steps (integer factors at batch.thresholds, OLMo-core-style); ramp, gns
    and steps change accumulation only, at step boundaries."""
    start_size: int | None = None
    """ramp, gns: the global batch of the first step (a multiple of world × micro-batch); batch.global_size is the
    largest (ramp's end, gns's cap)."""
    ramp_samples: int | None = None
    """ramp: training examples over which the global batch grows linearly from start_size to global_size."""
    thresholds: str | None = None
    """steps: count:size pairs, the global batch from each count of examples trained on, e.g. '0:64 200k:128 1M:256'
    (suffixes k, M, G): first count 0, each size an integer multiple of the one before and of world × micro-batch,
    the last size batch.global_size."""
    threshold_unit: str = "examples"
    """steps: what batch.thresholds counts: examples, or tokens (data.name=text or tokens, data.context tokens per
    example; a threshold becomes the first whole example count at or past it)."""


@dataclass
class OptimConfig:
    name: str = "sgd"
    """Optimizer: sgd, adamw, lars, larc, lamb, lambc, muon (Muon on weight matrices, AdamW on embeddings, head and
    ≤ 1-D parameters), or torch_optimizer:<Class> (e.g. torch_optimizer:Lamb)."""
    lr: float = 0.1
    """Base learning rate at optim.reference_batch; the peak LR is scaled from it."""
    reference_batch: int = 256
    """Global batch at which optim.lr was tuned."""
    scaling: str = "linear"
    """LR scaling rule from the reference batch: linear, sqrt, none, or auto (by optimizer family: linear for sgd,
    lars and larc, sqrt for the Adam family; printed at start and written to config.yaml's derived.scaling)."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw and lamb, L2 for sgd and lars); never on excluded parameters."""
    exclude_1d: bool = True
    """Exclude every ≤ 1-D parameter (biases, norm weights) from weight decay and layer-wise adaptation."""
    exclude: list[str] = field(default_factory=list)
    """More parameter-name patterns (fnmatch, e.g. '*.bias', 'token.*') to exclude the same way."""
    momentum: float = 0.9
    """sgd, lars: momentum."""
    nesterov: bool = False
    """sgd, lars: Nesterov momentum."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adamw, lamb, muon (its AdamW side): moment coefficients."""
    eps: float = 1e-8
    """adamw, lamb, muon (its AdamW side): denominator epsilon; lars: added to the trust-ratio denominator."""
    trust_coefficient: float = 0.001
    """lars, larc: η in the local LR η·‖w‖/(‖g‖ + wd·‖w‖)."""
    trust_clip: float | None = None
    """lamb: clamp the trust ratio to [0, trust_clip] (lambc defaults to 10)."""
    bias_correction: bool = True
    """lamb: Adam's bias correction of the moments."""
    impl: str = "auto"
    """lars, lamb: auto (fused kernel where it builds), fused, or foreach (the readable reference)."""
    options: dict = field(default_factory=dict)
    """torch_optimizer:<Class>: keyword options passed through, e.g. {clamp_value: 10}. muon: momentum (0.95),
    nesterov (true), ns_steps (5), ns_dtype (bf16 or fp32), adjust_lr (original, match_rms_adamw or spectral_unclamped),
    adamw_lr and adamw_weight_decay (default optim.lr and optim.weight_decay), adamw (more name patterns for AdamW)."""
    groups: list[dict[str, Any]] = field(default_factory=list)
    """An optimizer per group of parameters, instead of optim.name: an ordered list of {match, name, options...};
    the first group whose match fits a parameter takes it. match: a kind (matrix, embedding, head, bias, norm, 1d)
    or a parameter-name pattern (fnmatch); name: sgd, adamw, lars, larc, lamb, lambc or muon; options: that
    optimizer's optim.* keys (lr, weight_decay, betas, ...; muon: momentum, nesterov, ns_steps, ns_dtype, adjust_lr),
    defaulting to the top-level optim.* values (muon's to its own). e.g. [{match: matrix, name: muon, lr: 0.02},
    {match: '*', name: adamw, lr: 0.003}]."""
    scale_beta2: bool = False
    """adamw, lamb: set β2 to β2^(global batch / reference_batch) at each batch size, keeping the second moment's
    half-life fixed in examples (Marek et al. 2025)."""
    scale_weight_decay: bool = False
    """adamw, lamb: scale optim.weight_decay (given for optim.reference_batch and optim.lr) at each global batch B
    with peak LR η(B) to λ·(B / reference_batch)·(optim.lr / η(B)), keeping the decay's timescale B/(η·λ) in
    examples fixed (Wang & Aitchison 2024; Bergsma et al. 2025): λ stays under linear scaling, grows ∝ √B under
    sqrt, ∝ B under none."""


@dataclass
class ScheduleConfig:
    name: str = "constant"
    """Decay after warmup: constant, cosine, step or poly."""
    warmup_steps: int | None = None
    """Linear warmup from ~0 to the peak LR over this many steps."""
    warmup_epochs: float | None = None
    """Warmup length in epochs (Goyal et al. use 5); exclusive with warmup_steps."""
    min_lr_ratio: float = 0.0
    """cosine, poly: final LR as a fraction of the peak."""
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    """step: fractions of training at which the LR is multiplied by gamma."""
    gamma: float = 0.1
    """step: decay factor at each milestone."""
    power: float = 2.0
    """poly: exponent (LARS uses 2)."""


@dataclass
class TrainConfig:
    steps: int | None = None
    """Optimizer steps; exclusive with epochs (default 100 steps if neither is set)."""
    epochs: float | None = None
    """Training length in epochs of ⌊dataset size / global batch⌋ steps."""
    loss: str | None = None
    """Default: cross-entropy of the model's logits, summed over the targets that are not train.ignore_index.
    `model`: the model computes its own mean loss from the targets (nanoGPT's forward(idx, targets) → (logits,
    loss); Hugging Face's labels= → .loss), turned into a sum by × the count of targets != train.ignore_index.
    `pkg.module:callable(output, targets)` → (sum of loss terms, number of terms)."""
    ignore_index: int = -100
    """The target value that is no loss term (padding): ignored by the built-in cross-entropy, written by padded
    datasets (jsonl), excluded from the count of train.loss=model (nanoGPT's model ignores -1)."""
    clip_grad_norm: float | None = None
    """Clip the global gradient norm to this value (after the all-reduce)."""
    compile: bool | str = False
    """torch.compile the model in place (its state-dict keys unchanged): true (inductor) or a torch.compile backend
    name (aot_eager tells a compile bug from a model bug). DDP compiles its wrapper, FSDP each sharded block (else the
    whole model); refused on DeepSpeed. Off by default: on CPU the first step compiles for tens of seconds and the
    steps after barely gain (docs/benchmarks.md)."""
    precision: str = "fp32"
    """fp32, bf16 (autocast) or fp16 (autocast + GradScaler)."""
    eval_every: int = 0
    """Evaluate every N steps; 0 evaluates only at the end."""
    log_every: int = 10
    """Write a metrics.jsonl record (and reduce metrics across ranks) every N steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps and at the end; 0 saves none."""
    checkpoint_keep: int = 3
    """Keep the newest N checkpoints."""
    fp16_init_scale: float = 65536.0
    """fp16: initial loss scale of the GradScaler (halved on overflow, doubled after 2000 good steps)."""
    noise_scale: bool = False
    """Estimate the gradient noise scale (≈ critical batch size) every train.noise_every steps; needs 2+ processes or
    accumulation. The metrics records carry the latest smoothed estimate (gns, gns/grad_sq, gns/trace)."""
    noise_every: int | None = None
    """Measure the noise scale every N steps. Default: every step under batch.schedule=gns (the schedule follows
    it, so its cadence is part of the trajectory), else train.log_every (measured where logged: on DDP, measuring
    leaves the gradients bit-identical, so neither cadence changes the trajectory)."""
    cbs_every: int = 0
    """Every N steps, measure the critical batch by branching (largebatch.cbs: short continuations at
    train.cbs_sizes for train.cbs_examples each, in memory, the run unchanged); one line per measurement in cbs.jsonl.
    0: never."""
    cbs_sizes: list[int] = field(default_factory=list)
    """train.cbs_every's global batches (multiples of world × micro-batch). Default: ⅛× to 4× batch.global_size in
    powers of two."""
    cbs_examples: int | None = None
    """train.cbs_every's examples per branch. Default: 8 × the largest of train.cbs_sizes."""
    nonfinite: str = "skip"
    """A NaN/inf loss or gradient: skip the step (counted and logged) or stop the run."""
    target: str | None = None
    """Stop at the first eval step where eval/<metric>=VALUE is reached (≥ VALUE; ≤ for a metric named *loss*),
    e.g. eval/accuracy=0.97; summary.json records the step and examples it took."""


@dataclass
class EngineConfig:
    name: str = "ddp"
    """ddp (torch DistributedDataParallel), deepspeed (ZeRO stages 0-3, optional CPU offload) or fsdp (torch FSDP2:
    parameters, gradients and optimizer state sharded)."""
    zero_stage: int = 0
    """deepspeed: 0 (data parallel), 1 (optimizer state sharded), 2 (+ gradients), 3 (+ parameters)."""
    offload: str = "none"
    """deepspeed: none, or cpu (optimizer state and step on the CPU; stage 1+)."""
    ds_config: str | dict | None = None
    """deepspeed: raw DeepSpeed config keys (a JSON/YAML path or a mapping) merged over the ones the plan sets."""
    shard_blocks: list[str] = field(default_factory=list)
    """fsdp: class names of the modules to shard as units (default: a Hugging Face model's _no_split_modules, else
    the classes the model repeats, e.g. its transformer or residual blocks)."""


@dataclass(frozen=True)
class Target:
    """A held-out metric to reach: eval/<metric>=VALUE; a loss is reached from above, anything else from below."""

    key: str
    value: float

    @staticmethod
    def parse(text: str, option: str = "train.target") -> Target:
        key, _, value = text.partition("=")
        try:
            target = Target(key.strip(), float(value))
        except ValueError:
            target = None
        if target is None or not target.key.startswith("eval/") or not math.isfinite(target.value):
            raise UserError(
                f"{option}={text} must be eval/<metric>=<number>, e.g. eval/accuracy=0.97 or "
                f"eval/loss=0.5"
            )
        return target

    def met(self, record: Mapping[str, Any]) -> bool:
        value = record.get(self.key)
        if value is None:
            return False
        return value <= self.value if "loss" in self.key else value >= self.value


@dataclass
class LoggingConfig:
    progress: bool = True
    """Print a progress line on rank 0 at every log step."""
    wandb: str = "disabled"
    """Mirror metrics to Weights & Biases from rank 0: disabled, offline or online (WANDB_* variables win)."""
    project: str | None = None
    """wandb project (default largebatch)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    origin = None
    """The directory of the config file (None without one): user factories import from it and the working directory."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DERIVED = "derived"
"""Section that resolved configs carry (batch plan, peak LR); recomputed, so ignored on load."""


def load(path: str | Path | Mapping[str, Any] | None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or take a mapping of sections, or start from defaults), apply `section.key=value`
    overrides, validate. Keys of the file or mapping that the chosen modes do not use are reset to their
    defaults with one warning; overrides that are not used stay errors."""
    raw: dict[str, Any] = {}
    if isinstance(path, Mapping):
        raw = {
            name: dict(values) if isinstance(values, Mapping) else values
            for name, values in path.items()
        }
    elif path is not None:
        raw = _read_yaml(Path(path))
    raw.pop(DERIVED, None)
    given: set[str] = set()
    for item in overrides:
        section, key, sub_keys, value = _parse_override(item)
        _set(raw, section, key, sub_keys, value, item)
        given.add(f"{section}.{key}")
    cfg = Config(**{name: _build_section(name, values) for name, values in raw.items()})
    cfg.origin = str(Path(path).resolve().parent) if isinstance(path, (str, Path)) else None
    reset = _reset_unused(cfg, given)
    validate(cfg)
    # After validation, an error is the one line a failing command prints; a given optimizer key that the optimizer
    # ignores is the optimizer registry's error (with its own fix), raised once torch is loaded.
    rejected = any(key in given for key, _ in _unused_optimizer_keys(cfg))
    if reset and not rejected:
        warn(reset)
    return cfg


def _set(
    raw: dict[str, Any], section: str, key: str, sub_keys: tuple[str, ...], value: Any, item: str
) -> None:
    """Apply one override to the raw sections: `key` replaced, or one entry of its mapping set (sub-keys),
    the file's other entries kept and missing intermediate mappings created."""
    if raw.get(section) is None:
        raw[section] = {}
    if not isinstance(raw[section], dict):
        raise UserError(f"config section '{section}' must be a mapping of keys to values")
    if not sub_keys:
        raw[section][key] = value
        return
    current = raw[section].get(key)
    if isinstance(current, str):
        raise UserError(
            f"{section}.{key}={current} names a file, so {item} has no mapping to set a key in; "
            f"set the key in that file, or give {section}.{key} as a mapping"
        )
    if current is not None and not isinstance(current, Mapping):
        raise UserError(f"{section}.{key}={current!r} must be a mapping, e.g. {{name: value}}")
    merged = copy.deepcopy(dict(current or {}))
    node = merged
    for depth, name in enumerate(sub_keys[:-1], 1):
        if node.get(name) is None:
            node[name] = {}
        if not isinstance(node[name], dict):
            inner = ".".join((section, key, *sub_keys[:depth]))
            raise UserError(
                f"{inner}={node[name]!r} is not a mapping, so {item} cannot set a key in it; "
                f"replace it whole with {inner}={{...}}"
            )
        node = node[name]
    node[sub_keys[-1]] = value
    raw[section][key] = merged


def validate(cfg: Config) -> None:
    """Checks that need no data or torch: choices, value ranges, the chosen registry entries' own checks and keys
    that the chosen mode ignores."""
    check_choice("optim.scaling", cfg.optim.scaling, ("linear", "sqrt", "none", "auto"))
    check_choice("optim.impl", cfg.optim.impl, ("auto", "fused", "foreach"))
    for decider in ("schedule.name", "engine.name", "batch.schedule"):  # data, model: where built
        check_choice(decider, _get(cfg, decider), list(REGISTRIES[decider]))
    check_choice("train.precision", cfg.train.precision, list(MODES["train.precision"]))
    check_choice("train.nonfinite", cfg.train.nonfinite, ("skip", "stop"))
    check_choice("logging.wandb", cfg.logging.wandb, ("disabled", "offline", "online"))
    if cfg.train.target is not None:
        Target.parse(cfg.train.target)
        if not cfg.train.eval_every:
            raise UserError(
                "train.target is checked on eval steps: set train.eval_every (e.g. a hundredth of the run)"
            )
    if cfg.train.noise_every is not None and not cfg.train.noise_scale:
        raise UserError(
            f"train.noise_every={cfg.train.noise_every} sets how often the noise scale is measured: "
            f"set train.noise_scale=true, or drop train.noise_every"
        )
    if (cfg.train.cbs_sizes or cfg.train.cbs_examples) and not cfg.train.cbs_every:
        raise UserError(
            "train.cbs_sizes and train.cbs_examples set up train.cbs_every's measurement: set "
            "train.cbs_every (steps between measurements), or drop them"
        )
    if isinstance(cfg.batch.micro_size, str):
        check_choice("batch.micro_size", cfg.batch.micro_size, list(MODES["batch.micro_size"]))
    _check_finite(cfg)
    positive = {
        "data.size": cfg.data.size,
        "data.eval_size": cfg.data.eval_size,
        "model.width": cfg.model.width,
        "model.depth": cfg.model.depth,
        "model.heads": cfg.model.heads,
        "data.context": cfg.data.context,
        "data.image_size": cfg.data.image_size,
        "data.stride": cfg.data.stride,
        "optim.reference_batch": cfg.optim.reference_batch,
        "train.steps": cfg.train.steps,
        "train.epochs": cfg.train.epochs,
        "train.log_every": cfg.train.log_every,
        "train.noise_every": cfg.train.noise_every,
        "train.cbs_examples": cfg.train.cbs_examples,
        "train.clip_grad_norm": cfg.train.clip_grad_norm,
        "schedule.power": cfg.schedule.power,
        "train.checkpoint_keep": cfg.train.checkpoint_keep,
        "train.fp16_init_scale": cfg.train.fp16_init_scale,
        "run.threads": cfg.run.threads,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"{key}={value} must be positive")
    non_negative = {
        "data.workers": cfg.data.workers,
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.cbs_every": cfg.train.cbs_every,
        "model.grad_checkpointing": cfg.model.grad_checkpointing,
        "schedule.warmup_steps": cfg.schedule.warmup_steps,
        "schedule.warmup_epochs": cfg.schedule.warmup_epochs,
    }
    for key, value in non_negative.items():
        if value is not None and value < 0:
            raise UserError(f"{key}={value} must not be negative")
    for key, value in (("run.seed", cfg.run.seed), ("data.seed", cfg.data.seed)):
        if not 0 <= value < 2**63:
            raise UserError(f"{key}={value} must be an integer in [0, 2**63), e.g. 0")
    for key, value in (
        ("data.label_noise", cfg.data.label_noise),
        ("schedule.min_lr_ratio", cfg.schedule.min_lr_ratio),
    ):
        if not 0 <= value <= 1:
            raise UserError(f"{key}={value} must be between 0 and 1")
    if not 0 < cfg.data.eval_fraction < 1:
        raise UserError(
            f"data.eval_fraction={cfg.data.eval_fraction} must be between 0 and 1 (exclusive)"
        )
    if cfg.train.steps is not None and cfg.train.epochs is not None:
        raise UserError("set train.steps or train.epochs, not both")
    if cfg.schedule.warmup_steps is not None and cfg.schedule.warmup_epochs is not None:
        raise UserError("set schedule.warmup_steps or schedule.warmup_epochs, not both")
    o = cfg.optim
    optim_args.check(
        "optim.",
        o.nesterov,
        lr=o.lr,
        momentum=o.momentum,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        trust_coefficient=o.trust_coefficient,
        trust_clip=o.trust_clip,
    )
    _coerce_groups(o)
    for decider, registry in REGISTRIES.items():
        entry = registry.get(mode(decider, _get(cfg, decider)))
        for check in entry.checks if entry else ():
            check(cfg)
    _check_used(cfg)


def _coerce_groups(o: OptimConfig) -> None:
    """Type-check the optim.* keys inside optim.groups entries as the top-level keys are (the optimizer layer checks
    their names and values)."""
    hints = typing.get_type_hints(OptimConfig)
    for index, group in enumerate(o.groups):
        for key, value in group.items():
            if key in hints:
                group[key] = _coerce(f"optim.groups[{index}].{key}", value, hints[key])


def _check_finite(cfg: Config) -> None:
    """Reject NaN and inf (YAML .nan, .inf) in every number: they pass any range check, since NaN compares false."""
    for section in dataclasses.fields(cfg):
        for key, value in vars(getattr(cfg, section.name)).items():
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise UserError(f"{section.name}.{key}={value} must be finite")


MODES: dict[str, dict[str, tuple[str, ...]]] = {
    "batch.micro_size": {"auto": ("batch.memory_limit",)},
    "train.precision": {"fp32": (), "bf16": (), "fp16": ("train.fp16_init_scale",)},
}
"""The deciding keys that are settings, not registries: {deciding key: {value: the keys that value uses}}."""


def mode_keys() -> dict[str, dict[str, tuple[str, ...]]]:
    """{deciding key: {value: the keys that value uses}}, from the registries and MODES. A key listed under a
    deciding key is ignored by the values that do not list it; keys listed nowhere (data.seed, train.loss, ...)
    apply whatever the mode."""
    tables = {
        decider: {n: e.keys for n, e in table.items()} for decider, table in REGISTRIES.items()
    }
    return tables | MODES


def mode(decider: str, value: Any) -> Any:
    """The registry entry (or MODES value) a value falls under: every pkg.module:callable falls under the
    registry's FACTORY entry, a hub model (torchvision:<name>) under its prefix's entry."""
    table = REGISTRIES.get(decider, {})
    if FACTORY not in table or not isinstance(value, str) or ":" not in value:
        return value
    prefix = value.partition(":")[0] + ":"
    return next((n for n in table if n != FACTORY and n.startswith(prefix)), FACTORY)


def _unused(cfg: Config) -> list[tuple[str, str]]:
    """(key, deciding key) for every key set away from its default that the chosen dataset, model, micro-batch
    mode, schedule, precision or engine ignores (mode_keys)."""
    defaults = Config()
    found = []
    for decider, uses in mode_keys().items():
        current = mode(decider, _get(cfg, decider))
        if isinstance(current, str) and current not in uses:
            continue  # an unknown name; the registry's own check says so, with "did you mean"
        for key in dict.fromkeys(k for keys in uses.values() for k in keys):
            if key not in uses.get(current, ()) and _get(cfg, key) != _get(defaults, key):
                found.append((key, decider))
    return found


def _check_used(cfg: Config) -> None:
    """Reject a key that the chosen modes ignore (mode_keys)."""
    unused = _unused(cfg)
    if unused:
        key, decider = unused[0]
        users = [value for value, keys in mode_keys()[decider].items() if key in keys]
        raise ignored_key(key, decider, _get(cfg, decider), users)


def _unused_optimizer_keys(cfg: Config) -> list[tuple[str, str]]:
    """(key, "optim.name") for every optimizer-specific key set away from its default that the chosen optimizer
    ignores (registry.OPTIMIZER_OPTIONS), for `_reset_unused`: a given one is the optimizer registry's one-line
    error, with its own fix. None under optim.groups, which checks its top-level keys itself."""
    family = optimizer_family(cfg.optim.name)
    known = {name for users in OPTIMIZER_OPTIONS.values() for name in users}
    if cfg.optim.groups or family not in known:
        return []
    defaults = OptimConfig()
    return [
        (f"optim.{key}", "optim.name")
        for key, users in OPTIMIZER_OPTIONS.items()
        if family not in users and getattr(cfg.optim, key) != getattr(defaults, key)
    ]


def _reset_unused(cfg: Config, given: set[str]) -> str | None:
    """Reset to their defaults the keys that the chosen modes ignore and that were not `given` as overrides, and
    say which: a built-in config's model.width stops mattering when model.name switches to your own model, and
    config.yaml should not carry it. The keys `given` stay for validate to reject."""
    unused = [
        (key, decider)
        for key, decider in [*_unused(cfg), *_unused_optimizer_keys(cfg)]
        if key not in given
    ]
    if not unused:
        return None
    defaults = Config()
    groups: dict[str, list[str]] = {}
    for key, decider in unused:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, _get(defaults, key))
        groups.setdefault(decider, []).append(key)
    return "config keys that do not apply are reset to their defaults: " + "; ".join(
        f"{', '.join(keys)} (unused with {decider}={_get(cfg, decider)})"
        for decider, keys in groups.items()
    )


def ignored_key(
    key: str, decider: str, current: Any, users: list[str], fix: str | None = None
) -> UserError:
    """The error for `key`, set although `decider`=`current` ignores it; `users`: the values of `decider` that use
    it."""
    *others, last = [str(u) for u in users]
    names = f"{', '.join(others)} and {last}" if others else last
    fix = fix or (f"set {decider}={last}" if not others else f"set {decider} to one of those")
    shown = "null" if current is None else current
    return UserError(
        f"{key} is ignored with {decider}={shown} (only {names} use{'s' if not others else ''} it); "
        f"remove it or {fix}"
    )


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def dump(cfg: Config, derived: dict[str, Any], path: Path) -> None:
    """Write the resolved config with its derived values (batch plan, peak LR, lengths)."""
    path.write_text(yaml.safe_dump({**cfg.to_dict(), DERIVED: derived}, sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(
            f"config file {path} must be a mapping of sections (run:, data:, ...), not {type(raw).__name__}"
        )
    return raw


def _parse_override(item: str) -> tuple[str, str, tuple[str, ...], Any]:
    """`section.key=value` or `section.key.sub[.sub2...]=value` (one entry of a mapping-typed key) → section,
    key, sub-keys and the YAML-parsed value; an unknown section or key, or sub-keys of a key that is not a
    mapping, is a UserError."""
    name, sep, text = item.partition("=")
    section, *keys = name.split(".")
    if not sep or not section or not keys or not all(keys):
        raise UserError(
            f"override {item!r} must look like section.key=value, e.g. optim.lr=0.2 or "
            f"model.args.n_layer=4"
        )
    sections = typing.get_type_hints(Config)
    check_choice("config section", section, list(sections))
    hints = typing.get_type_hints(sections[section])
    key, *sub_keys = keys
    check_choice(f"{section} key", key, list(hints))
    if sub_keys and f"{section}.{key}" not in mapping_keys():
        raise UserError(
            f"{section}.{key} has no sub-keys ({item}); only {', '.join(mapping_keys())} take "
            f"section.key.sub=value, e.g. model.args.n_layer=4"
        )
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    return section, key, tuple(sub_keys), value


def mapping_keys() -> list[str]:
    """The keys that hold a mapping (model.args, ...), whose entries `section.key.sub=value` sets one by one."""
    return [
        f"{section}.{key}"
        for section, cls in typing.get_type_hints(Config).items()
        for key, hint in typing.get_type_hints(cls).items()
        if dict in (hint, typing.get_origin(hint), *typing.get_args(hint))
    ]


def _build_section(name: str, values: Any) -> Any:
    sections = typing.get_type_hints(Config)
    check_choice("config section", name, list(sections))
    cls = sections[name]
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise UserError(f"config section '{name}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    for key in values:
        check_choice(f"{name} key", key, list(hints))
    return cls(
        **{key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in values.items()}
    )


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint, widening int to float; raise a one-line error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except UserError:
                continue
        raise UserError(f"{key}={value!r} must be {_type_name(hint)}")
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}={value!r} must be a mapping, e.g. {{name: value}}")
        return _numbers(value)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{key}={value!r} must be a list, e.g. [{_type_name(args[0])}, ...]")
        return [_coerce(key, v, args[0]) for v in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"{key}={value!r} must be {_type_name(hint)}")


EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation that YAML 1.1 reads as a string (5e7, 1e-3, 2.5e7: no dot or no exponent sign)."""


def _numbers(value: Any) -> Any:
    """A mapping's entries with 5e7-style strings read as numbers (YAML 1.2's reading), since nothing types
    them: builder arguments and DeepSpeed keys want the number."""
    if isinstance(value, dict):
        return {key: _numbers(entry) for key, entry in value.items()}
    if isinstance(value, list):
        return [_numbers(entry) for entry in value]
    return float(value) if isinstance(value, str) and EXPONENT.fullmatch(value) else value


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args) + (
            " or null" if len(args) < len(typing.get_args(hint)) else ""
        )
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, str(hint)
    )
