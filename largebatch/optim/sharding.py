"""Whole-parameter norms for LARS and LAMB when parameters are sharded (FSDP2's `fully_shard`).

A trust ratio needs ‖w‖ of the whole parameter, but each process holds a dim-0 shard of it (a
DTensor, possibly empty). The optimizers sum squares over their local shards, then `reduce_sums`
adds up each parameter's sums over its shards, for every parameter of every group in one
all-reduce per step (`two_pass_step`).
"""

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from largebatch.dist import several_ranks


def _dtensor() -> type | None:
    """The DTensor class, or None while torch.distributed.tensor is not imported: then no tensor is
    a DTensor, and unsharded runs do without its import (0.4 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module.DTensor if module is not None else None


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (updating it updates the DTensor), or `t` itself."""
    dtensor = _dtensor()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def sum_squares(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """[n, 2] float64 with the sums of squares of xs[i] and ys[i] in row i.

    They are torch's norms squared exactly in float64: the square root gives back the same ‖x‖, so
    whole tensors step as they did with norms alone, and shards' sums add up in float64. Norms taken
    in float64 would be more exact for large tensors, at 3-13× the cost on the CPU.
    """
    norms = [torch.stack(torch._foreach_norm(tensors)) for tensors in (xs, ys)]
    return torch.stack(norms, dim=1).double().square()


def is_sharded(params: list[Tensor]) -> bool:
    """Whether any of `params` is a DTensor sharded over processes, whose norms need `reduce_sums`."""
    dtensor = _dtensor()
    return dtensor is not None and any(
        isinstance(p, dtensor) and any(placement.is_shard() for placement in p.placements)
        for p in params
    )


def reduce_sums(params: list[Tensor], sums: Tensor) -> Tensor:
    """Whole-parameter sums of squares from local ones, in one all-reduce for all parameters.

    Row i of `sums` ([n, 2] float64) holds sums of squares over this process's shard of params[i].
    Rows of plain tensors stay as they are; a DTensor's row is summed over its device mesh, where a
    replicated one counts once (from mesh rank 0). No collective when no parameter is sharded.
    """
    if not is_sharded(params):
        return sums
    dtensor = _dtensor()
    rows = [i for i, p in enumerate(params) if isinstance(p, dtensor)]
    for i in rows:
        p = params[i]
        if p.device_mesh.ndim != 1:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) is a DTensor on a {p.device_mesh.ndim}-D device mesh "
                f"{p.placements}; LARS and LAMB support 1-D meshes only: shard with fully_shard over one mesh "
                "dimension (no HSDP or tensor parallelism)"
            )
        if p.placements[0].is_partial():
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) is a Partial DTensor; "
                "redistribute it to Shard or Replicate before the optimizer step"
            )
    if len({params[i].device_mesh.get_group() for i in rows}) != 1:
        raise ValueError(
            "the parameters are DTensors over several process groups; LARS and LAMB reduce their "
            "norms in one all-reduce, so shard them all over one device mesh"
        )
    mesh = params[rows[0]].device_mesh
    index = torch.tensor(rows, device=sums.device)
    shared = sums.index_select(0, index)
    if mesh.get_local_rank() != 0:
        replicated = torch.tensor(
            [params[i].placements[0].is_replicate() for i in rows], device=sums.device
        )
        shared.masked_fill_(replicated[:, None], 0.0)
    if several_ranks(mesh.get_group()):
        dist.all_reduce(shared, group=mesh.get_group())
    return sums.index_copy(0, index, shared)


def step(
    param_groups: list[dict[str, Any]],
    whole_step: Callable[[dict[str, Any], list[Tensor]], None],
    first_pass: Callable[[dict[str, Any], list[Tensor]], tuple[Tensor, Callable[[Tensor], None]]],
) -> None:
    """A LARS or LAMB step over the parameters that have gradients: `whole_step(group, params)` group by group,
    or `two_pass_step` if any of them is sharded."""
    groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in param_groups]
    groups = [(group, params) for group, params in groups if params]
    if is_sharded([p for _, params in groups for p in params]):
        two_pass_step(groups, first_pass)
    else:
        for group, params in groups:
            whole_step(group, params)


def two_pass_step(
    groups: list[tuple[dict[str, Any], list[Tensor]]],
    first_pass: Callable[[dict[str, Any], list[Tensor]], tuple[Tensor, Callable[[Tensor], None]]],
) -> None:
    """A LARS or LAMB step over sharded parameters: `first_pass(group, params)` on every group gives
    its [n, 2] local sums and its second pass; all sums are reduced at once; then the second passes."""
    passes = [first_pass(group, params) for group, params in groups]
    local_sums = torch.cat([sums for sums, _ in passes])
    sums = reduce_sums([p for _, params in groups for p in params], local_sums)
    for (_, second_pass), group_sums in zip(
        passes, sums.split([len(params) for _, params in groups])
    ):
        second_pass(group_sums)
