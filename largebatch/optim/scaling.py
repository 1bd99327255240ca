"""LR scaling from a reference batch (Goyal et al. 2017 linear rule; Krizhevsky 2014 sqrt rule), the rule that
optim.scaling=auto picks by optimizer family, and the weight decay that keeps its timescale with the LR."""

from __future__ import annotations

import math

from largebatch.config import OptimConfig
from largebatch.errors import UserError

AUTO_RULES: dict[str, tuple[str, str]] = {
    "sgd": ("linear", "SGD family, Goyal et al. 2017"),
    "lars": ("linear", "SGD family, Goyal et al. 2017"),
    "larc": ("linear", "SGD family, Goyal et al. 2017"),
    "adamw": ("sqrt", "Adam family, Malladi et al. 2022"),
    "lamb": ("sqrt", "Adam family, Malladi et al. 2022; You et al. 2019 for LAMB"),
    "lambc": ("sqrt", "Adam family, Malladi et al. 2022; You et al. 2019 for LAMB"),
    # Muon's orthogonalised update has a fixed size whatever the gradient's scale, as Adam's has, and Moonlight
    # (Liu et al. 2025) matches its update RMS to AdamW's so that AdamW's LR carries over: the Adam rule.
    "muon": ("sqrt", "normalised update like Adam's, Liu et al. 2025"),
}
"""optim.scaling=auto: optimizer name → (rule, why). The SDE view: SGD's noise per unit time stays the same when
the LR grows with the batch (linear); adaptive methods normalise the update, which gives the square-root rule."""


def scaling_rule(cfg: OptimConfig) -> str:
    """optim.scaling, with auto resolved by optim.name (AUTO_RULES): linear, sqrt or none."""
    if cfg.scaling != "auto":
        return cfg.scaling
    if cfg.name not in AUTO_RULES:
        known = {
            rule: [n for n, (r, _) in AUTO_RULES.items() if r == rule]
            for rule in ("linear", "sqrt")
        }
        picks = " and ".join(f"{rule} for {', '.join(names)}" for rule, names in known.items())
        raise UserError(
            f"optim.scaling=auto picks {picks}; for optim.name={cfg.name} set optim.scaling to linear, "
            f"sqrt or none"
        )
    return AUTO_RULES[cfg.name][0]


def describe_rule(cfg: OptimConfig) -> str:
    """What optim.scaling=auto chose and why, for the start line."""
    rule, why = AUTO_RULES[cfg.name]
    return f"optim.scaling=auto → {rule} for {cfg.name} ({why})"


def peak_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """lr × (global / reference) for `linear`, lr × √(global / reference) for `sqrt`, lr for `none`."""
    ratio = global_batch / reference_batch
    return base_lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def describe_peak_lr(base_lr: float, global_batch: int, reference_batch: int, rule: str) -> str:
    """The peak LR for the start line, saying how scaling changed the given LR when it did."""
    lr = peak_lr(base_lr, global_batch, reference_batch, rule)
    if lr == base_lr:
        return f"peak lr {lr:.6g}"
    return (
        f"optim.lr {base_lr:g} at reference {reference_batch} → {lr:.6g} at global {global_batch} "
        f"(optim.scaling={rule})"
    )


def weight_decay_factor(global_batch: int, reference_batch: int, rule: str) -> float:
    """optim.scale_weight_decay's factor on a decoupled weight decay λ at `global_batch`: (B / B_ref)·(η_ref / η(B)).

    Decoupled decay (AdamW's p ← p·(1 − η·λ) − η·u) makes the weights an exponential average of the updates over
    1/(η·λ) steps, B/(η·λ) examples (Wang & Aitchison 2024); the best timescale in examples stays put when the batch
    changes and the data does not (Bergsma et al. 2025, "Power Lines": τ = B/(η·λ·D)). So λ(B) = λ_ref·(B / B_ref)·
    (η_ref / η(B)), with λ_ref = optim.weight_decay and η_ref = optim.lr given for optim.reference_batch: 1 under
    linear scaling, √(B / B_ref) under sqrt, B / B_ref under none. Every group's peak LR follows the same rule, so
    the factor is the same for each group's own (for Muon: unadjusted) LR; a group without decay keeps 0.
    """
    return (global_batch / reference_batch) / peak_lr(1.0, global_batch, reference_batch, rule)
