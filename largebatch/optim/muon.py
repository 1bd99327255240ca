"""Muon for weight matrices, AdamW for the rest, in one optimizer; whole-matrix and not redundant when sharded.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers"; torch.optim.Muon since 2.9) per matrix W with
gradient G: B ← μB + (1 − μ)G (torch's `lerp_`), U = G + μ(B − G) with Nesterov else B, O = NS₅(U) (a quintic
Newton–Schulz iteration with coefficients (3.4445, −4.7750, 2.0315) on U/‖U‖_F, in bf16 by default),
W ← W(1 − η·λ) (decoupled decay with the *unadjusted* η), W ← W − η·s·O with s = √max(1, A/B) ("original"),
0.2·√max(A, B) ("match_rms_adamw", Liu et al. 2025, Moonlight) or √(A/B) ("spectral_unclamped") for the (A, B)
matrix. That is torch.optim.Muon's update, operation for operation; where we differ: parameters of 3+ dims (conv
kernels) are orthogonalised as the (out, in·k·k) matrix of their flattened trailing dims, as Keller Jordan's CIFAR-10
speedrun does (torch raises); matrices of one shape are orthogonalised in one batched matmul chain; `ns_dtype="fp32"`
runs the iteration in fp32 (torch hard-codes bf16). Hugging Face GPT-2's `Conv1D` stores (in, out): the iteration
does not care (NS(Uᵀ) = NS(U)ᵀ), and `build_param_groups` marks those weights `transposed` so that the LR adjustment
uses (out, in); fused Q/K/V (`c_attn`) are one matrix, as in Moonlight.

Groups with `use_muon=False` (Keller Jordan's MuonWithAuxAdam marker) step with torch's AdamW (decoupled weight
decay, `torch.optim.adam.adam`), with their own lr, betas, eps and weight decay.

Sharded (FSDP2's dim-0 DTensors on a 1-D mesh, uneven or empty shards included): momentum stays sharded like its
parameter; each matrix gets an owner rank (largest Newton–Schulz FLOPs first, each to the least loaded rank), one
`all_to_all_single` sends the owners every shard of their matrices' U (already in the iteration's dtype, as torch
casts before it), the owners orthogonalise whole matrices, and a second `all_to_all_single` returns each rank its rows
of O. Two collectives per step whatever the number of matrices, and each rank does ≈ 1/world of the iterations.
Replicated (DDP: `replicated` names the process group), the same owners orthogonalise their matrices and one
`all_gather` gives every rank all results, equal to every rank computing them all.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.adam import adam

from largebatch import optim_args
from largebatch.optim.sharding import _dtensor, local

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of X ← aX + (bA + cA²)X with A = XXᵀ (Jordan 2024; torch.optim.Muon's defaults)."""
ADJUST_LR = ("original", "match_rms_adamw", "spectral_unclamped")
NS_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCHED_SIZE = 256 * 256
"""Matrices of up to this many entries and one shape are orthogonalised in one batched matmul chain (it saves
per-call overhead on small ones); larger ones one by one."""


def adjusted_lr(lr: float, rule: str, rows: int, cols: int) -> float:
    """η·s for an (rows, cols) = (A, B) = (fan-out, fan-in) matrix, as torch.optim.Muon's `_adjust_lr`."""
    if rule == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(rows / cols)


def newton_schulz(u: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """NS_steps of each matrix of `u` ([n, A, B], in the iteration's dtype), as torch's `_zeropower_via_newtonschulz`:
    tall matrices are iterated transposed, after division by their Frobenius norm (clamped to eps). One matrix runs
    as 2-D matmuls (on the CPU, bf16 `bmm` is up to 1.8× slower than `mm` for large matrices)."""
    if u.size(0) == 1:
        return _newton_schulz_2d(u[0], steps, eps)[None]
    a, b, c = NS_COEFFICIENTS
    tall = u.size(1) > u.size(2)
    x = u.mT if tall else u
    x = x / torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _newton_schulz_2d(u: Tensor, steps: int, eps: float) -> Tensor:
    a, b, c = NS_COEFFICIENTS
    tall = u.size(0) > u.size(1)
    x = u.T if tall else u
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def ns_flops(rows: int, cols: int, steps: int) -> int:
    """Multiply-adds × 2 of `steps` iterations on an (rows, cols) matrix (m = the smaller side, n the larger)."""
    m, n = sorted((rows, cols))
    return steps * 2 * (2 * m * m * n + m * m * m)


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard, as DTensor's Shard(0) and FSDP2 lay them out (torch.chunk: ⌈rows/world⌉ each,
    the last ones shorter or empty)."""
    chunk = -(-rows // world)
    return [max(0, min(rows, (r + 1) * chunk) - r * chunk) for r in range(world)]


def owners(flops: list[int], world: int) -> list[int]:
    """An owner rank per matrix, balancing the FLOPs: largest first, each to the least loaded rank (ties: lowest)."""
    load, owner = [0] * world, [0] * len(flops)
    for i in sorted(range(len(flops)), key=lambda i: (-flops[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i], load[rank] = rank, load[rank] + flops[i]
    return owner


@dataclass
class _Matrix:
    """One parameter's momentum-blended update U as a 2-D (rows, cols) matrix: this rank's rows of it in `local`."""

    local: Tensor
    rows: int
    cols: int
    steps: int
    sharded: bool

    @property
    def key(self) -> tuple[int, int, int, torch.dtype]:
        return self.rows, self.cols, self.steps, self.local.dtype


def _orthogonalize_all(
    matrices: dict[int, Tensor], specs: dict[int, _Matrix], eps: float
) -> dict[int, Tensor]:
    """NS of every whole matrix in `matrices` (index → (rows, cols)); small ones batched over equal shapes, steps and
    dtypes."""
    batches: dict[tuple, list[int]] = defaultdict(list)
    for i in matrices:
        small = specs[i].rows * specs[i].cols <= BATCHED_SIZE
        batches[specs[i].key if small else (i,)].append(i)
    out = {}
    for index in batches.values():
        steps = specs[index[0]].steps
        result = newton_schulz(torch.stack([matrices[i] for i in index]), steps, eps)
        out.update(zip(index, result.unbind(0)))
    return out


def orthogonalize(
    matrices: list[_Matrix],
    group: dist.ProcessGroup | None,
    eps: float,
    replicated: dist.ProcessGroup | None = None,
) -> list[Tensor]:
    """O = NS(U) of each matrix, this rank's rows of it for sharded ones (over `group`): sharded ones by their owners,
    with one all-to-all of U's shards to the owners and one of O's shards back; plain ones here, or, when they are the
    same on every rank of `replicated` (DDP), by their owners in it, with one all-gather of the results."""
    specs = dict(enumerate(matrices))
    plain = [i for i, m in specs.items() if not m.sharded]
    if replicated is not None and dist.get_world_size(replicated) > 1 and plain:
        result = _orthogonalize_replicated(plain, specs, replicated, eps)
    else:
        result = _orthogonalize_all({i: specs[i].local for i in plain}, specs, eps)
    sharded = [i for i, m in specs.items() if m.sharded]
    if sharded:
        result.update(_orthogonalize_sharded(sharded, specs, group, eps))
    return [result[i] for i in range(len(matrices))]


def _orthogonalize_replicated(
    index: list[int], specs: dict[int, _Matrix], group: dist.ProcessGroup, eps: float
) -> dict[int, Tensor]:
    """Each rank orthogonalises the matrices it owns; one all-gather (of byte buffers padded to the longest) gives
    every rank all results."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    flops = [ns_flops(specs[i].rows, specs[i].cols, specs[i].steps) for i in index]
    owner = dict(zip(index, owners(flops, world)))
    owned = [[i for i in index if owner[i] == r] for r in range(world)]
    done = _orthogonalize_all({i: specs[i].local for i in owned[rank]}, specs, eps)
    sizes = [[specs[i].local.numel() * specs[i].local.element_size() for i in o] for o in owned]
    longest = max(sum(s) for s in sizes)
    send = torch.zeros(longest, dtype=torch.uint8, device=specs[index[0]].local.device)
    if owned[rank]:
        mine = torch.cat([done[i].contiguous().reshape(-1).view(torch.uint8) for i in owned[rank]])
        send[: mine.numel()] = mine
    gathered = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(gathered, send, group=group)
    result = {}
    for r in range(world):
        pieces = gathered[r][: sum(sizes[r])].split(sizes[r])
        for i, piece in zip(owned[r], pieces):
            result[i] = piece.view(specs[i].local.dtype).view(specs[i].rows, specs[i].cols)
    return result


def _orthogonalize_sharded(
    index: list[int], specs: dict[int, _Matrix], group: dist.ProcessGroup, eps: float
) -> dict[int, Tensor]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = dict(
        zip(
            index,
            owners([ns_flops(specs[i].rows, specs[i].cols, specs[i].steps) for i in index], world),
        )
    )
    rows = {i: shard_rows(specs[i].rows, world) for i in index}
    for i in index:
        if specs[i].local.shape != (rows[i][rank], specs[i].cols):
            raise ValueError(
                f"matrix {i} ({specs[i].rows} × {specs[i].cols}) has a local shard of {tuple(specs[i].local.shape)} "
                f"on rank {rank}, not torch.chunk's {rows[i][rank]} rows; Muon needs FSDP2's Shard(0) layout"
            )
    mine = [i for i in index if owner[i] == rank]
    device = specs[index[0]].local.device

    def nbytes(i: int, r: int) -> int:
        return rows[i][r] * specs[i].cols * specs[i].local.element_size()

    def exchange(pieces: list[list[Tensor]], receive: list[list[int]]) -> list[list[Tensor]]:
        """Send pieces[d] (byte views) to rank d; return the pieces received from each rank, split as `receive`."""
        flat = [p.reshape(-1).view(torch.uint8) for ps in pieces for p in ps]
        send = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=device)
        sizes = [sum(r) for r in receive]
        out = torch.empty(sum(sizes), dtype=torch.uint8, device=send.device)
        dist.all_to_all_single(
            out,
            send,
            sizes,
            [sum(p.numel() * p.element_size() for p in ps) for ps in pieces],
            group=group,
        )
        return [list(chunk.split(r)) for chunk, r in zip(out.split(sizes), receive)]

    gathered = exchange(
        [[specs[i].local.contiguous() for i in index if owner[i] == d] for d in range(world)],
        [[nbytes(i, s) for i in mine] for s in range(world)],
    )
    whole = {
        i: torch.cat(
            [
                gathered[s][k].view(specs[i].local.dtype).view(rows[i][s], specs[i].cols)
                for s in range(world)
            ]
        )
        for k, i in enumerate(mine)
    }
    done = _orthogonalize_all(whole, specs, eps)
    returned = exchange(
        [[done[i].split(rows[i])[d] for i in mine] for d in range(world)],
        [[nbytes(i, rank) for i in index if owner[i] == s] for s in range(world)],
    )
    result = {}
    for s in range(world):
        for piece, i in zip(returned[s], [i for i in index if owner[i] == s]):
            result[i] = piece.view(specs[i].local.dtype).view(rows[i][rank], specs[i].cols)
    return result


def _placement(p: Tensor) -> tuple[bool, dist.ProcessGroup | None]:
    """(sharded on dim 0 over a mesh of 2+ ranks, its process group) for a parameter; other layouts raise."""
    dtensor = _dtensor()
    if dtensor is None or not isinstance(p, dtensor):
        return False, None
    if p.device_mesh.ndim != 1:
        raise ValueError(
            f"a Muon parameter of shape {tuple(p.shape)} is a DTensor on a {p.device_mesh.ndim}-D mesh; "
            "shard with fully_shard over one mesh dimension (no HSDP or tensor parallelism)"
        )
    placement = p.placements[0]
    if placement.is_replicate() or p.device_mesh.size() == 1:
        return False, None
    if not (placement.is_shard() and placement.dim == 0):
        raise ValueError(
            f"a Muon parameter of shape {tuple(p.shape)} is placed {placement}; Muon needs Shard(0)"
        )
    return True, p.device_mesh.get_group()


class Muon(torch.optim.Optimizer):
    """Muon on groups with `use_muon` (default), torch's AdamW on groups with `use_muon=False`; see the module.

    `replicated`: a process group over which the plain (not DTensor) parameters and gradients are the same on every
    rank (DDP's): their Newton–Schulz work is split over it as for sharded ones, with one all-gather of the results.
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
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=True,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        """Momentum on local shards, then Newton–Schulz of whole matrices (`orthogonalize`), then decay and update."""
        todo: list[tuple[dict[str, Any], Tensor, tuple[int, int]]] = []
        matrices: list[_Matrix] = []
        process_group = None
        for group in groups:
            dtype, mu = NS_DTYPES[group["ns_dtype"]], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon got a {p.ndim}-D parameter of shape {tuple(p.shape)}; give it to AdamW"
                    )
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                grad, buf = local(p.grad), local(state["momentum_buffer"])
                buf.lerp_(grad, 1 - mu)
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                sharded, pg = _placement(p)
                if sharded:
                    if process_group is not None and pg is not process_group:
                        raise ValueError("Muon's sharded parameters must all be on one device mesh")
                    process_group = pg
                rows, cols = p.shape[0], math.prod(p.shape[1:])
                matrices.append(
                    _Matrix(
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
        for (group, p, (rows, cols)), o in zip(
            todo, orthogonalize(matrices, process_group, 1e-7, self.replicated)
        ):
            w = local(p)
            w.mul_(1 - group["lr"] * group["weight_decay"])
            w.add_(o.view_as(w), alpha=-adjusted_lr(group["lr"], group["adjust_lr"], rows, cols))


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
