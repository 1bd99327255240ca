"""optim.groups: an optimizer per group of parameters, stepped as one optimizer (`Composite`).

Each group is `{match: <pattern or kind>, name: <optimizer>, <options…>}`, in order, and a parameter goes to the
first group that matches it. `match` is a kind (KINDS) or else an fnmatch pattern of `named_parameters()` names.
`name` is one of NAMES; the options are that optimizer's optim.* keys (lr, weight_decay and the keys the registry's
OPTIONS gives it; a muon group takes MUON_OPTIONS instead, with muon's defaults); unset ones take the top-level
optim.* value. optim.exclude_1d and optim.exclude still say which parameters of a group take no weight decay and no
layer-wise adaptation. A group's lr follows the batch like optim.lr: its peak LR is the same scaling of it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from largebatch import optim_args
from largebatch.config import OptimConfig, ignored_key
from largebatch.errors import UserError, check_choice
from largebatch.optim import muon, split
from largebatch.optim.composite import Composite
from largebatch.registry import OPTIMIZER_OPTIONS, POSITIVE_EPS

KINDS: dict[str, str] = {
    "matrix": "≥ 2-D parameters that are not embeddings or the output head",
    "embedding": "every nn.Embedding's parameters",
    "head": "the output head: get_output_embeddings() of an hf: model, else the last nn.Linear",
    "bias": "≤ 1-D parameters named *.bias",
    "norm": "≤ 1-D parameters of normalisation layers (a module class named *Norm*)",
    "1d": "every ≤ 1-D parameter",
}
"""The kinds a group's `match` can name instead of a pattern."""
NAMES = ("sgd", "adamw", "lars", "larc", "lamb", "lambc", "muon")
MUON_OPTIONS = ("lr", "weight_decay", "momentum", "nesterov", "ns_steps", "ns_dtype", "adjust_lr")
CATCH_ALL = "add a catch-all group at the end, e.g. {match: '*', name: adamw}"

Named = list[tuple[str, torch.Tensor]]


@dataclasses.dataclass
class Group:
    """One entry of optim.groups, checked: its position, match, optimizer and that optimizer's resolved config."""

    index: int
    match: str
    name: str
    cfg: OptimConfig
    """optim.* with this group's options over the top-level values (muon: its options in `options`)."""

    @property
    def where(self) -> str:
        return f"optim.groups[{self.index}]"


def options_of(name: str) -> tuple[str, ...]:
    """The keys a group of optimizer `name` takes besides match and name."""
    if name == "muon":
        return MUON_OPTIONS
    own = (k for k, users in OPTIMIZER_OPTIONS.items() if name in users and k != "options")
    return ("lr", "weight_decay", *own)


def from_top_level(name: str) -> tuple[str, ...]:
    """The optim.* keys whose top-level values a group of optimizer `name` takes when it does not set them."""
    return ("lr", "weight_decay") if name == "muon" else options_of(name)


def parse(cfg: OptimConfig) -> list[Group]:
    """optim.groups checked (keys, optimizer names, option values, each error naming the group), resolved."""
    if cfg.name != OptimConfig().name:
        raise UserError(
            f"optim.name={cfg.name} and optim.groups are both set; each group names its optimizer: "
            "drop optim.name (or override it with its default, optim.name=sgd)"
        )
    if cfg.options:
        raise UserError(
            "optim.options is optim.name's; with optim.groups, set options in each group, "
            "e.g. {match: matrix, name: muon, ns_dtype: fp32}"
        )
    groups = [_group(i, entry, cfg) for i, entry in enumerate(cfg.groups)]
    _check_used(cfg, groups)
    return groups


def _check_used(cfg: OptimConfig, groups: list[Group]) -> None:
    """Reject a top-level optimizer-specific key (registry OPTIONS) set away from its default that no group's
    optimizer takes from there (a muon group takes only lr and weight_decay from the top level)."""
    defaults = OptimConfig()
    takes = {k for g in groups for k in from_top_level(g.name)}
    for key, users in OPTIMIZER_OPTIONS.items():
        if key != "options" and key not in takes and getattr(cfg, key) != getattr(defaults, key):
            names = "[" + ", ".join(g.name for g in groups) + "]"
            fix = "set it in the group that needs it"
            raise ignored_key(
                f"optim.{key}", "optim.groups", names, [u for u in users if u != "muon"], fix
            )


def _group(index: int, entry: dict[str, Any], cfg: OptimConfig) -> Group:
    where = f"optim.groups[{index}]"
    if not isinstance(entry.get("match"), str) or "name" not in entry:
        raise UserError(
            f"{where}={entry!r} needs match (a parameter-name pattern such as '*.bias', or one of "
            f"{', '.join(KINDS)}) and name (the optimizer), e.g. {{match: matrix, name: lamb}}"
        )
    name = check_choice(f"{where}.name", entry["name"], NAMES)
    given = {k: v for k, v in entry.items() if k not in ("match", "name")}
    for key in given:
        check_choice(f"{where} key for name={name}", key, options_of(name))
    prefix = f"{where}."
    if name == "muon":
        merged = split.checked(given, prefix)
        own = {k: given[k] for k in ("lr", "weight_decay") if k in given}
        resolved = dataclasses.replace(
            cfg, name=name, groups=[], options={k: merged[k] for k in MUON_OPTIONS[2:]}, **own
        )
    else:
        resolved = dataclasses.replace(cfg, name=name, groups=[], **given)
    used = [k for k in from_top_level(name) if k in optim_args.RULES]
    optim_args.check(
        prefix,
        resolved.nesterov and "nesterov" in from_top_level(name),
        **{k: getattr(resolved, k) for k in used},
    )
    if "impl" in given:
        check_choice(f"{prefix}impl", given["impl"], ("auto", "fused", "foreach"))
    if name in POSITIVE_EPS:
        optim_args.check_positive_eps(name, resolved.eps, prefix)
    return Group(index, entry["match"], name, resolved)


def check(cfg: OptimConfig, model: nn.Module | None = None) -> None:
    """Every group well-formed; with `model`, every group taking some parameter and every parameter taken (what an
    engine cannot run, it refuses from its declared capabilities)."""
    groups = parse(cfg)
    if model is not None:
        assign(model, groups)


def assign(model: nn.Module, groups: list[Group]) -> list[Named]:
    """The trainable (name, parameter) pairs of each group, first match winning."""
    kinds = _kinds(model)
    taken: list[Named] = [[] for _ in groups]
    matched = [False] * len(groups)
    unmatched: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [i for i, g in enumerate(groups) if _matches(g.match, name, p, kinds)]
        for i in hits:
            matched[i] = True
        if hits:
            taken[hits[0]].append((name, p))
        else:
            unmatched.append(name)
    for group, hit, got in zip(groups, matched, taken):
        shown = f"{group.where} {{match: {group.match!r}, name: {group.name}}}"
        if not hit:
            raise UserError(
                f"{shown} matches no parameter; use a kind ({', '.join(KINDS)}) or a pattern of the model's "
                f"parameter names (e.g. {next(iter(dict(model.named_parameters())), '?')!r}), or drop the group"
            )
        if not got:
            raise UserError(
                f"{shown} takes no parameter: earlier groups take all it matches (the first match wins); "
                "move it up or drop it"
            )
        flat = [n for n, p in got if p.ndim < 2]
        if group.name == "muon" and flat:
            raise UserError(
                f"{shown} takes {len(flat)} parameters of ≤ 1 dims ({flat[0]!r}, ...), which Muon cannot "
                "orthogonalise; put a group for them before it, e.g. {match: 1d, name: adamw}"
            )
    if unmatched:
        raise UserError(
            f"{len(unmatched)} parameters ({unmatched[0]!r}, ...) are matched by no group of optim.groups; {CATCH_ALL}"
        )
    return taken


def _kinds(model: nn.Module) -> dict[str, Callable[[str, torch.Tensor], bool]]:
    embeddings, head = split.embeddings(model), split.output_head(model)
    norms = {
        id(p)
        for m in model.modules()
        if "Norm" in type(m).__name__
        for p in m.parameters(recurse=False)
    }
    return {
        "matrix": lambda n, p: p.ndim >= 2 and id(p) not in embeddings | head,
        "embedding": lambda n, p: id(p) in embeddings,
        "head": lambda n, p: id(p) in head,
        "bias": lambda n, p: p.ndim <= 1 and n.rpartition(".")[2] == "bias",
        "norm": lambda n, p: p.ndim <= 1 and id(p) in norms,
        "1d": lambda n, p: p.ndim <= 1,
    }


def _matches(match: str, name: str, p: torch.Tensor, kinds: dict[str, Callable[..., bool]]) -> bool:
    return kinds[match](name, p) if match in kinds else fnmatch.fnmatchcase(name, match)


def build(
    model: nn.Module,
    cfg: OptimConfig,
    lr: float,
    excluded: Callable[..., bool],
    builders: dict[str, Callable[[list[dict], OptimConfig, float], torch.optim.Optimizer]],
) -> Composite:
    """One optimizer per group over its parameters, as one `Composite`; `lr` is optim.lr's peak LR, and each
    group's peak is the same scaling of its own lr; `builders`: the optimizer registry's, by name."""
    groups = parse(cfg)
    children, labels = [], []
    for group, named in zip(groups, assign(model, groups)):
        peak = lr * group.cfg.lr / cfg.lr
        if group.name == "muon":
            children.append(_muon(model, group.cfg, named, peak, excluded))
        else:
            param_groups = [
                {
                    "params": [p for n, p in named if excluded(n, p, cfg) != adapt],
                    "lr": peak,
                    "weight_decay": group.cfg.weight_decay if adapt else 0.0,
                    "adapt": adapt,
                }
                for adapt in (True, False)
            ]
            param_groups = [g for g in param_groups if g["params"]]
            children.append(builders[group.name](param_groups, group.cfg, peak))
        labels.append(f"[{group.index}] {group.match} → {group.name}")
    return Composite(children, labels)


def _muon(
    model: nn.Module, cfg: OptimConfig, named: Named, lr: float, excluded: Callable[..., bool]
) -> muon.Muon:
    """muon.Muon over the group's matrices, grouped by decay and by `transposed` storage."""
    stored_transposed = split.transposed(model)
    by_kind: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in named:
        key = (not excluded(name, p, cfg), id(p) in stored_transposed)
        by_kind.setdefault(key, []).append(p)
    return split.make(
        [
            {"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "transposed": t}
            for (decay, t), ps in sorted(by_kind.items(), key=lambda kv: (not kv[0][0], kv[0][1]))
        ],
        cfg,
        cfg.options,
        lr,
    )
