"""Newton–Schulz orthogonalisation of whole matrices: on one process, split over DDP replicas, or over FSDP2 shards.

The iteration is torch.optim.Muon's (`_zeropower_via_newtonschulz`, Jordan 2024) in a chosen dtype; small matrices
of one shape run as one batched matmul chain. Sharded (FSDP2's dim-0 DTensors on a 1-D mesh, uneven or empty shards
included): each matrix gets an owner rank (largest FLOPs first, each to the least loaded rank), one
`all_to_all_single` sends the owners every shard of their matrices' U (already in the iteration's dtype), the owners
orthogonalise whole matrices, and a second `all_to_all_single` returns each rank its rows of the result: two
collectives per step whatever the number of matrices, and each rank does ≈ 1/world of the iterations (Dion and
torchtitan's DistMuon batch matrices world at a time instead). Replicated (DDP), the same owners orthogonalise their
matrices and one `all_gather` gives every rank all results, equal to every rank computing them all.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.optim.sharding import _dtensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""(a, b, c) of X ← aX + (bA + cA²)X with A = XXᵀ (Jordan 2024; torch.optim.Muon's defaults)."""
BATCHED_SIZE = 256 * 256
"""Matrices of up to this many entries and one shape are orthogonalised in one batched matmul chain (it saves
per-call overhead on small ones); larger ones one by one."""


def newton_schulz(u: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """NS_steps of each matrix of `u` ([n, A, B], in the iteration's dtype), as torch's `_zeropower_via_newtonschulz`,
    after division by the Frobenius norm (clamped to eps). torch iterates a tall matrix transposed, X = Uᵀ; here it is
    iterated in place of its transpose, U ← aU + U(bA + cA²) with A = UᵀU (the same products: BLAS reads the transposed
    operand, and the result is bit for bit torch's), so the result needs no transposed copy before it is applied. One
    matrix runs as 2-D matmuls into reused buffers (on the CPU, bf16 `bmm` is up to 1.8× slower than `mm` for large
    matrices)."""
    if u.size(0) == 1:
        return _newton_schulz_2d(u[0], steps, eps)[None]
    a, b, c = NS_COEFFICIENTS
    tall = u.size(1) > u.size(2)
    x = u / torch.linalg.vector_norm(u, dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x.mT @ x if tall else x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, update, beta=a) if tall else torch.baddbmm(x, update, x, beta=a)
    return x


def _newton_schulz_2d(u: Tensor, steps: int, eps: float) -> Tensor:
    a, b, c = NS_COEFFICIENTS
    tall = u.size(0) > u.size(1)
    x, side = u / u.norm().clamp(min=eps), min(u.shape)
    gram, update, y = x.new_empty(side, side), x.new_empty(side, side), torch.empty_like(x)
    for _ in range(steps):
        torch.mm(x.T, x, out=gram) if tall else torch.mm(x, x.T, out=gram)
        torch.addmm(gram, gram, gram, beta=b, alpha=c, out=update)
        if tall:
            torch.addmm(x, x, update, beta=a, out=y)
        else:
            torch.addmm(x, update, x, beta=a, out=y)
        x, y = y, x
    return x


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
class Matrix:
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
    matrices: dict[int, Tensor], specs: dict[int, Matrix], eps: float
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
        stacked = (  # a view, not a stacked copy, for a matrix alone in its batch
            matrices[index[0]][None]
            if len(index) == 1
            else torch.stack([matrices[i] for i in index])
        )
        result = newton_schulz(stacked, steps, eps)
        out.update(zip(index, result.unbind(0)))
    return out


def orthogonalize(
    matrices: list[Matrix],
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
    index: list[int], specs: dict[int, Matrix], group: dist.ProcessGroup, eps: float
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
    index: list[int], specs: dict[int, Matrix], group: dist.ProcessGroup, eps: float
) -> dict[int, Tensor]:
    """This rank's rows of O for dim-0-sharded matrices: one all-to-all of U's shards to each matrix's owner (bytes,
    in the iteration's dtype), whole-matrix iterations there, one all-to-all of O's rows back."""
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


def placement(p: Tensor) -> tuple[bool, dist.ProcessGroup | None]:
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
