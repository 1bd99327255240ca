"""optim.name=muon from the config: its options, and which parameters Muon takes and which go to AdamW.

Muon takes the weight matrices of hidden layers (and conv kernels, as (out, in·k·k) matrices); AdamW takes the
embeddings (every `nn.Embedding`, so a head tied to one too), the output head (`get_output_embeddings()` of an hf:
model, else the last `nn.Linear` registered), every ≤ 1-D parameter (biases, norms) and the names matching
optim.options.adamw patterns. optim.lr and optim.weight_decay are Muon's; the AdamW side takes optim.betas and
optim.eps, and optim.options.adamw_lr and adamw_weight_decay (default: optim.lr and optim.weight_decay).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from largebatch import optim_args
from largebatch.config import OptimConfig
from largebatch.errors import UserError, check_choice
from largebatch.optim import muon
from largebatch.optim.composite import Composite

OPTIONS: dict[str, Any] = {
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "ns_dtype": "bf16",
    "adjust_lr": "original",
    "adamw_lr": None,
    "adamw_weight_decay": None,
    "adamw": [],
}
"""optim.options of optim.name=muon and their defaults (torch.optim.Muon's, for the first five)."""
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "nesterov": (lambda v: isinstance(v, bool), "must be true or false"),
    "ns_steps": (
        lambda v: isinstance(v, int) and 1 <= v < 100,
        "must be an integer in [1, 100), e.g. 5",
    ),
    "ns_dtype": (lambda v: v in muon.NS_DTYPES, f"must be one of {', '.join(muon.NS_DTYPES)}"),
    "adjust_lr": (lambda v: v in muon.ADJUST_LR, f"must be one of {', '.join(muon.ADJUST_LR)}"),
    "adamw_lr": (lambda v: v is None or v > 0, "must be positive (or unset: optim.lr)"),
    "adamw_weight_decay": (
        lambda v: v is None or v >= 0,
        "must not be negative (or unset: optim.weight_decay)",
    ),
    "adamw": (
        lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v),
        "must be a list of parameter-name patterns, e.g. ['*.gate']",
    ),
}


def options(cfg: OptimConfig) -> dict[str, Any]:
    """optim.options over the defaults, checked: an unknown option or a value outside its rule is a UserError."""
    for key in cfg.options:
        check_choice("optim.options key for optim.name=muon", key, list(OPTIONS))
    return checked(cfg.options, "optim.options.")


def checked(given: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Muon's options `given` over their defaults (OPTIONS), checked: momentum and nesterov by optim_args' rules,
    the others by CHECKS; an error names the key after `prefix` (optim.options., or an optim.groups entry's)."""
    merged = {**OPTIONS, **given}
    optim_args.check(prefix, merged["nesterov"], momentum=merged["momentum"])
    for key, (holds, says) in CHECKS.items():
        if not holds(merged[key]):
            raise UserError(f"{prefix}{key}={merged[key]!r} {says}")
    return merged


def param_groups(
    model: nn.Module, cfg: OptimConfig, lr: float, excluded: Callable[..., bool]
) -> list[dict]:
    """Muon's groups first (by decay, and by `transposed` storage), then AdamW's (by decay); no empty group.

    `lr` is the peak LR of optim.lr; AdamW's is the same scaling of optim.options.adamw_lr. `excluded(name, param,
    cfg)` says which parameters take no weight decay (optim.exclude_1d, optim.exclude)."""
    o = options(cfg)
    aux = embeddings(model) | output_head(model)
    stored_transposed = transposed(model)
    adamw_lr = lr * (o["adamw_lr"] if o["adamw_lr"] is not None else cfg.lr) / cfg.lr
    adamw_decay = (
        o["adamw_weight_decay"] if o["adamw_weight_decay"] is not None else cfg.weight_decay
    )
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        use_muon = not (
            p.ndim < 2 or id(p) in aux or any(fnmatch.fnmatchcase(name, a) for a in o["adamw"])
        )
        decay = not excluded(name, p, cfg)
        if use_muon:
            key = (True, decay, id(p) in stored_transposed)
            group = {"use_muon": True, "lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
            group["transposed"] = key[2]
        else:
            key = (False, decay, False)
            group = {
                "use_muon": False,
                "lr": adamw_lr,
                "weight_decay": adamw_decay if decay else 0.0,
            }
        groups.setdefault(key, {**group, "params": []})["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (not k[0], not k[1], k[2]))]


def build(
    model: nn.Module, cfg: OptimConfig, lr: float, excluded: Callable[..., bool]
) -> muon.Muon:
    """The Muon optimizer of optim.name=muon over `model`."""
    return make(param_groups(model, cfg, lr, excluded), cfg, options(cfg), lr)


def make(groups: list[dict], cfg: OptimConfig, muon_options: dict, lr: float) -> muon.Muon:
    """muon.Muon over `groups` with Muon's own `muon_options` (optim.options, resolved) and the AdamW side's betas
    and eps from `cfg`; its non-DTensor parameters' Newton–Schulz split over the ranks where there are several."""
    o = muon_options
    return muon.Muon(
        groups,
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=o["momentum"],
        nesterov=o["nesterov"],
        ns_steps=o["ns_steps"],
        ns_dtype=o["ns_dtype"],
        adjust_lr=o["adjust_lr"],
        replicated=replicated(),
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )


def replicated() -> dist.ProcessGroup | None:
    """The default process group when there are 2+ ranks: there, parameters that are not DTensors are DDP's (or
    ZeRO-0's) replicas, whose Newton–Schulz work Muon splits over the ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def derived(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"optimizer_split": {"muon": {tensors, params}, "adamw": {...}}} for config.yaml (optim.groups: a list of
    {group, tensors, params}), or {} if neither Muon nor optim.groups."""
    if isinstance(optimizer, Composite):
        return {"optimizer_split": optimizer.split()}
    if not isinstance(optimizer, muon.Muon):
        return {}
    split = {side: {"tensors": 0, "params": 0} for side in ("muon", "adamw")}
    for group in optimizer.param_groups:
        side = split["muon" if group["use_muon"] else "adamw"]
        side["tensors"] += len(group["params"])
        side["params"] += sum(p.numel() for p in group["params"])
    return {"optimizer_split": split}


def describe(optimizer: torch.optim.Optimizer) -> str | None:
    """The start line of the split, e.g. 'Muon: 8 matrices (1.2M parameters); AdamW: 14 tensors (0.3M)'."""
    split = derived(optimizer).get("optimizer_split")
    if split is None:
        return None
    if isinstance(split, list):
        return "optim.groups: " + "; ".join(
            f"{g['group']}: {g['tensors']} tensors ({g['params'] / 1e6:.3g}M parameters)"
            for g in split
        )
    m, a = split["muon"], split["adamw"]
    return (
        f"optim.name=muon: Muon on {m['tensors']} matrices ({m['params'] / 1e6:.3g}M parameters), AdamW on "
        f"{a['tensors']} tensors ({a['params'] / 1e6:.3g}M: embeddings, output head, biases, norms)"
    )


def output_head(model: nn.Module) -> set[int]:
    """ids of the output head's parameters: an hf model's `get_output_embeddings()`, else the last `nn.Linear`
    registered (the classifier of torchvision models, nanoGPT's `lm_head`)."""
    for module in model.modules():
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module):
            return {id(p) for p in head.parameters()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return {id(p) for p in linears[-1].parameters()} if linears else set()


def embeddings(model: nn.Module) -> set[int]:
    """ids of every `nn.Embedding`'s parameters (token and position tables; a tied head is the same tensor)."""
    return {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}


def transposed(model: nn.Module) -> set[int]:
    """ids of weights stored as (in, out): Hugging Face's `Conv1D` (GPT-2)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    if utils is None:
        return set()
    return {id(m.weight) for m in model.modules() if isinstance(m, utils.Conv1D)}
