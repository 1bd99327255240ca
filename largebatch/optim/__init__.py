"""Optimizer registry and parameter groups.

Names: sgd, adamw, lars, larc (LARS with trust clipping), lamb, lambc (LAMB with the trust ratio
clamped to optim.trust_clip, default 10), and torch_optimizer:<Class> for any optimizer of the
torch-optimizer package, with optim.options passed through as keyword arguments, and muon (Muon on weight matrices,
AdamW on the rest, options in optim.options: `split`). optim.groups gives groups of parameters optimizers of their
own, stepped as one (`groups`).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from largebatch import optim_args
from largebatch.config import OptimConfig, ignored_key
from largebatch.errors import UserError, check_choice
from largebatch.optim import groups, split
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.newton_schulz import placement
from largebatch.optim.scaling import scaling_rule
from largebatch.registry import OPTIMIZER_OPTIONS as OPTIONS
from largebatch.registry import POSITIVE_EPS, optimizer_family

ParamGroups = list[dict]
TORCH_OPTIMIZER = "torch_optimizer:"


def excluded(name: str, param: torch.Tensor, cfg: OptimConfig) -> bool:
    """No weight decay and no layer-wise adaptation: ≤ 1-D tensors (biases, norm weights; Goyal et al. §5.1)
    when optim.exclude_1d, and names matching an optim.exclude pattern."""
    return (cfg.exclude_1d and param.ndim <= 1) or any(
        fnmatch.fnmatchcase(name, p) for p in cfg.exclude
    )


def param_groups(model: nn.Module, cfg: OptimConfig) -> ParamGroups:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {
            "params": [p for n, p in named if not excluded(n, p, cfg)],
            "weight_decay": cfg.weight_decay,
            "adapt": True,
        },
        {
            "params": [p for n, p in named if excluded(n, p, cfg)],
            "weight_decay": 0.0,
            "adapt": False,
        },
    ]


def _sgd(groups: ParamGroups, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True
    )


def _adamw(groups: ParamGroups, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def _lars(
    groups: ParamGroups, cfg: OptimConfig, lr: float, clip: bool = False
) -> torch.optim.Optimizer:
    return LARS(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        trust_coefficient=cfg.trust_coefficient,
        eps=cfg.eps,
        nesterov=cfg.nesterov,
        trust_clip=clip,
        impl=cfg.impl,
    )


def _lamb(
    groups: ParamGroups, cfg: OptimConfig, lr: float, clip: float | None = None
) -> torch.optim.Optimizer:
    return LAMB(
        groups,
        lr=lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        bias_correction=cfg.bias_correction,
        trust_clip=clip,
        impl=cfg.impl,
    )


OPTIMIZERS: dict[str, Callable[[ParamGroups, OptimConfig, float], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adamw": _adamw,
    "lars": _lars,
    "larc": lambda groups, cfg, lr: _lars(groups, cfg, lr, clip=True),
    "lamb": lambda groups, cfg, lr: _lamb(groups, cfg, lr, clip=cfg.trust_clip),
    "lambc": lambda groups, cfg, lr: _lamb(groups, cfg, lr, clip=cfg.trust_clip or 10.0),
}
MODEL_OPTIMIZERS: dict[str, Callable[[nn.Module, OptimConfig, float], torch.optim.Optimizer]] = {
    "muon": lambda model, cfg, lr: split.build(model, cfg, lr, excluded),
}
"""Optimizers that group the parameters themselves, from the model's structure (`split`)."""


def _torch_optimizer_class(cfg: OptimConfig) -> type[torch.optim.Optimizer]:
    import torch_optimizer

    name = cfg.name.removeprefix(TORCH_OPTIMIZER)
    classes = sorted(
        n
        for n, c in vars(torch_optimizer).items()
        if inspect.isclass(c)
        and issubclass(c, torch.optim.Optimizer)
        and c.__module__.startswith("torch_optimizer")
    )
    cls = getattr(torch_optimizer, check_choice("optim.name torch_optimizer class", name, classes))
    accepted = inspect.signature(cls).parameters
    for option in cfg.options:
        if option not in accepted:
            raise UserError(
                f"torch_optimizer.{name} has no option {option!r} (optim.options); it takes "
                f"{', '.join(p for p in accepted if p not in ('self', 'params'))}"
            )
    return cls


def check(cfg: OptimConfig, model: nn.Module | None = None) -> None:
    """Fail before any process starts on an unknown optimizer, option, ignored key or impossible combination (what
    an engine cannot run, it refuses from its declared capabilities); with `model`: optim.groups that leave a group
    or a parameter out."""
    if cfg.groups:
        groups.check(cfg, model)
        return
    if cfg.name.startswith(TORCH_OPTIMIZER):
        _torch_optimizer_class(cfg)
    else:
        check_choice(
            "optim.name", cfg.name, [*OPTIMIZERS, *MODEL_OPTIMIZERS, f"{TORCH_OPTIMIZER}<Class>"]
        )
    _check_used(cfg)
    scaling_rule(cfg)
    if cfg.name == "muon":
        split.options(cfg)
    if cfg.name in POSITIVE_EPS:
        optim_args.check_positive_eps(cfg.name, cfg.eps, "optim.")


def _check_used(cfg: OptimConfig) -> None:
    """Reject an optimizer-specific key (OPTIONS) set away from its default when the chosen optimizer ignores it."""
    family = optimizer_family(cfg.name)
    defaults = OptimConfig()
    for key, users in OPTIONS.items():
        if family not in users and getattr(cfg, key) != getattr(defaults, key):
            fix = "pass the class's own option in optim.options" if family != cfg.name else None
            if cfg.name == "muon" and key in split.OPTIONS:
                fix = f"set optim.options.{key} (muon's own, default {split.OPTIONS[key]})"
            raise ignored_key(f"optim.{key}", "optim.name", cfg.name, list(users), fix)


def build(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name` over `model`'s parameter groups, starting at `lr`."""
    check(cfg)
    if cfg.groups:
        return groups.build(model, cfg, lr, excluded, OPTIMIZERS)
    if cfg.name in MODEL_OPTIMIZERS:
        return MODEL_OPTIMIZERS[cfg.name](model, cfg, lr)
    by_decay = param_groups(model, cfg)
    if cfg.name.startswith(TORCH_OPTIMIZER):
        for group in by_decay:
            group.pop("adapt")
        return _torch_optimizer_class(cfg)(by_decay, lr=lr, **cfg.options)
    return OPTIMIZERS[cfg.name](by_decay, cfg, lr)


def trust_ratios(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`trust_ratio/<parameter>` of the last step for every adapted parameter (one host sync), or {}."""
    fixed = {id(p) for g in optimizer.param_groups if not g.get("adapt", True) for p in g["params"]}
    named = [
        (n, optimizer.state[p]["trust_ratio"])
        for n, p in model.named_parameters()
        if id(p) not in fixed and "trust_ratio" in optimizer.state.get(p, {})
    ]
    if not named:
        return {}
    values = torch.stack([r.float() for _, r in named]).tolist()
    return {f"trust_ratio/{n}": v for (n, _), v in zip(named, values)}


def update_rms(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`update_rms/<parameter>` of the last step for every Muon matrix, or {}: the RMS of the update Muon added to the
    weights, η·s·O with the adjusted lr (weight decay not included; `match_rms_adamw` aims it at 0.2·η). Sharded
    matrices sum their shards' squares with one all-reduce (collective: every rank calls this); one host sync."""
    named = [
        (n, p, optimizer.state[p]["update_sumsq"])
        for n, p in model.named_parameters()
        if "update_sumsq" in optimizer.state.get(p, {})
    ]
    if not named:
        return {}
    sums = torch.stack([s for _, _, s in named])
    places = [placement(p) for _, p, _ in named]
    group = next((pg for sharded, pg in places if sharded), None)
    if group is not None:
        mask = torch.tensor([sharded for sharded, _ in places], device=sums.device)
        total = torch.where(mask, sums, 0.0)
        dist.all_reduce(total, group=group)
        sums = torch.where(mask, total, sums)
    sizes = torch.tensor([p.numel() for _, p, _ in named], dtype=sums.dtype, device=sums.device)
    values = (sums / sizes).sqrt().tolist()
    return {f"update_rms/{n}": v for (n, _, _), v in zip(named, values)}
