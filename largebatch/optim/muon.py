"""Muon for weight matrices, AdamW for the rest, in one optimizer; whole-matrix and not redundant when sharded.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch.optim.Muon since 2.9) per matrix W with
gradient G: B ← μB + (1 − μ)G (torch's `lerp_`), U = G + μ(B − G) with Nesterov else B, O = NS₅(U) (a quintic
Newton–Schulz iteration with coefficients (3.4445, −4.7750, 2.0315) on U/‖U‖_F, in bf16 by default),
W ← W(1 − η·λ) (decoupled decay with the *unadjusted* η), W ← W − η·s·O with s = √max(1, A/B) ("original"),
0.2·√max(A, B) ("match_rms_adamw", Liu et al. 2025, Moonlight) or √(A/B) ("spectral_unclamped") for the (A, B)
matrix. That is torch.optim.Muon's update, operation for operation; where we differ: parameters of 3+ dims (conv
kernels) are orthogonalised as the (out, in·k·k) matrix of their flattened trailing dims, as Keller Jordan's CIFAR-10
speedrun does (torch raises); `ns_dtype="fp32"` runs the iteration in fp32 (torch hard-codes bf16); groups marked
`transposed` hold weights stored as (in, out) (Hugging Face's `Conv1D`): the iteration does not care (NS(Uᵀ) =
NS(U)ᵀ), and the LR adjustment uses (out, in).

Groups with `use_muon=False` (Keller Jordan's MuonWithAuxAdam marker) step with torch's AdamW (decoupled weight
decay, `torch.optim.adamw.adamw`), with their own lr, betas, eps and weight decay. Nothing here needs
torch.optim.Muon (torch ≥ 2.9): the update is written out, so it runs on every torch the project supports.

Momentum stays sharded like its parameter (a DTensor under FSDP2); the Newton–Schulz iteration runs on whole
matrices, split over the ranks (`newton_schulz.orthogonalize`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.adamw import adamw

from largebatch import optim_args
from largebatch.optim.newton_schulz import Matrix, orthogonalize, placement
from largebatch.optim.sharding import local

ADJUST_LR = ("original", "match_rms_adamw", "spectral_unclamped")
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def adjusted_lr(lr: float, rule: str, rows: int, cols: int) -> float:
    """η·s for an (rows, cols) = (A, B) = (fan-out, fan-in) matrix, as torch.optim.Muon's `_adjust_lr`."""
    if rule == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(rows / cols)


class Muon(torch.optim.Optimizer):
    """Muon on groups with `use_muon` (default), torch's AdamW on groups with `use_muon=False`; see the module.

    `replicated`: a process group over which the plain (not DTensor) parameters and gradients are the same on every
    rank (DDP's): their Newton–Schulz work is split over it as for sharded ones, with one all-gather of the results.

    After each step ``state[p]["update_sumsq"]`` of a Muon matrix is the sum of squares of this rank's rows of the
    applied update η·s·O (weight decay not included; to the iteration dtype's precision), a 0-d fp32 tensor (no host
    sync); `optim.update_rms` reads it.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "bf16",
        adjust_lr: str = "original",
        replicated: dist.ProcessGroup | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        optim_args.check(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            betas=betas,
            eps=eps,
            nesterov=nesterov,
        )
        if ns_dtype not in NS_DTYPES:
            raise optim_args.OptimArgError(
                f"ns_dtype={ns_dtype!r} must be one of {', '.join(NS_DTYPES)}"
            )
        if adjust_lr not in ADJUST_LR:
            raise optim_args.OptimArgError(
                f"adjust_lr={adjust_lr!r} must be one of {', '.join(ADJUST_LR)}"
            )
        if not 1 <= ns_steps < 100:
            raise optim_args.OptimArgError(f"ns_steps={ns_steps} must be in [1, 100), e.g. 5")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "ns_dtype": ns_dtype,
            "adjust_lr": adjust_lr,
            "transposed": False,
            "use_muon": True,
        }
        super().__init__(params, defaults)
        self.replicated = replicated
        for group in self.param_groups:
            if group["use_muon"]:
                for key in ("betas", "eps"):
                    group.pop(key, None)
            else:
                group.setdefault("betas", tuple(betas))
                group.setdefault("eps", eps)
                for key in (
                    "momentum",
                    "nesterov",
                    "ns_steps",
                    "ns_dtype",
                    "adjust_lr",
                    "transposed",
                ):
                    group.pop(key, None)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        self._muon_step([g for g in self.param_groups if g["use_muon"]])
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """torch's AdamW on `group` (decoupled weight decay, bias correction, foreach)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        """Momentum on local shards, then Newton–Schulz of whole matrices (`orthogonalize`), then decay and update
        (foreach ops where the update allows: the per-tensor ops' results, with fewer calls)."""
        todo: list[tuple[dict[str, Any], Tensor, tuple[int, int]]] = []
        matrices: list[Matrix] = []
        process_group = None
        for group in groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon got a {p.ndim}-D parameter of shape {tuple(p.shape)}; give it to AdamW"
                    )
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            if not params:
                continue
            mu, dtype = group["momentum"], NS_DTYPES[group["ns_dtype"]]
            for p in params:
                grad, buf = local(p.grad), local(self.state[p]["momentum_buffer"])
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                sharded, pg = placement(p)
                if sharded:
                    if process_group is not None and pg is not process_group:
                        raise ValueError("Muon's sharded parameters must all be on one device mesh")
                    process_group = pg
                rows, cols = p.shape[0], math.prod(p.shape[1:])
                matrices.append(
                    Matrix(
                        update.reshape(update.shape[0], cols).to(dtype),
                        rows,
                        cols,
                        group["ns_steps"],
                        sharded,
                    )
                )
                todo.append((group, p, (cols, rows) if group["transposed"] else (rows, cols)))
        if not matrices:
            return
        results = orthogonalize(matrices, process_group, 1e-7, self.replicated)
        weights = [local(p) for _, p, _ in todo]
        torch._foreach_mul_(weights, [1 - g["lr"] * g["weight_decay"] for g, _, _ in todo])
        lrs = [adjusted_lr(g["lr"], g["adjust_lr"], rows, cols) for g, _, (rows, cols) in todo]
        for w, o, lr in zip(weights, results, lrs):
            w.add_(o.reshape(w.shape), alpha=-lr)
        # in the iteration's dtype (fp32 accumulation, the result rounded): a bf16 → fp32 copy first costs 2 % of a step
        norms = [n.float() for n in torch._foreach_norm(results)]
        sumsq = torch._foreach_mul(torch._foreach_mul(norms, norms), [lr * lr for lr in lrs])
        for (_, p, _), value in zip(todo, sumsq):
            self.state[p]["update_sumsq"] = value
