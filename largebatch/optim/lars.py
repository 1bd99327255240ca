"""LARS: momentum SGD with a layer-wise trust ratio.

You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks",
https://arxiv.org/abs/1708.03888
"""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from largebatch import optim_args
from largebatch.optim import fused, sharding


class LARS(Optimizer):
    """Momentum SGD whose gradient for each tensor is scaled by its trust ratio (eq. 6, Algorithm 1).

    For a tensor w with gradient g in a group with ``adapt=True`` (the default)::

        g' = g + wd·w
        ratio = η·‖w‖ / (‖g‖ + wd·‖w‖ + eps), or 1 where ‖w‖ or ‖g‖ is 0
        m = μ·m + ratio·g'
        w = w - lr·m                    (nesterov: w - lr·(ratio·g' + μ·m), as torch.optim.SGD)

    The ratio scales the gradient before it enters the momentum buffer, as timm and
    torch-optimizer do (the paper scales the step, ``m = μ·m + lr·ratio·g'``; the two agree for a
    constant lr). ``trust_clip=True`` is LARC: ratio = min(ratio / lr, 1), so a tensor never steps
    faster than lr; a zero-norm tensor keeps ratio 1 (timm clips that 1 too, which differs only for
    lr > 1).

    Groups with ``adapt=False`` (biases and norm weights, which should also get weight_decay=0)
    take plain momentum SGD with ratio 1. Unlike timm and torch-optimizer, a group with
    weight_decay=0 is not excluded from adaptation silently: exclusion is its ``adapt`` key.

    After each step ``state[p]["trust_ratio"]`` is the ratio used, a 0-d tensor (no host sync).
    Parameters may be DTensors sharded over a 1-D device mesh (FSDP2's fully_shard): the norms are
    then of the whole parameter, from one all-reduce per step (largebatch.optim.sharding), and the
    ratio is a plain tensor, the same on every process; the momentum buffer is a DTensor like the
    parameter.
    ``impl``: "foreach" uses torch._foreach_* ops on any device; "fused" uses a C++ kernel for
    contiguous fp32 CPU tensors and foreach for the rest; "auto" is fused if the kernel builds,
    else foreach with one warning. State is the same for every impl.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        trust_clip: bool = False,
        impl: str = "auto",
    ) -> None:
        optim_args.check(
            nesterov=nesterov,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
        )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            trust_clip=trust_clip,
            adapt=True,
        )
        super().__init__(params, defaults)
        self.impl = fused.check_impl(impl)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        sharding.step(self.param_groups, self._step, self._first_pass)
        return loss

    def _step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """One step of a group whose parameters are whole tensors: the fused kernel finishes each
        tensor before the next."""
        params, grads, buffers, trust_ratios = self._local_tensors(group, params)
        kernels = fused.kernels_for(self.impl, params, [grads, buffers] if buffers else [grads])
        (kernels.lars_step if kernels else foreach_lars_step)(
            params, grads, buffers, trust_ratios, *(group[key] for key in _HYPERPARAMETERS)
        )

    def _first_pass(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[Tensor, Callable[[Tensor], None]]:
        """Sum the squares of w and g over the local shards; returns the [n, 2] sums and the second
        pass, to call with the sums reduced over the shards."""
        params, grads, buffers, trust_ratios = self._local_tensors(group, params)
        kernels = fused.kernels_for(self.impl, params, [grads, buffers] if buffers else [grads])
        sums = (kernels.lars_sums if kernels else foreach_lars_sums)(params, grads, group["adapt"])
        apply = kernels.lars_apply if kernels else foreach_lars_apply
        hyperparameters = [group[key] for key in _HYPERPARAMETERS]
        return sums, lambda reduced: apply(
            params, grads, buffers, trust_ratios, reduced, *hyperparameters
        )

    def _local_tensors(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[list[Tensor], ...]:
        """Params, grads, momentum buffers (none without momentum; this process's shards of DTensors)
        and trust ratios."""
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LARS does not support sparse gradients")
        states = [self._state(p, group["momentum"]) for p in params]
        buffers = (
            [sharding.local(state["momentum_buffer"]) for state in states]
            if group["momentum"] != 0.0
            else []
        )
        return (
            [sharding.local(p) for p in params],
            [sharding.local(g) for g in grads],
            buffers,
            [state["trust_ratio"] for state in states],
        )

    def _state(self, p: Tensor, momentum: float) -> dict[str, Any]:
        state = self.state[p]
        if "trust_ratio" not in state:
            state["trust_ratio"] = torch.ones((), device=p.device)
        if momentum != 0.0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state


_HYPERPARAMETERS = (
    "lr",
    "momentum",
    "weight_decay",
    "trust_coefficient",
    "eps",
    "nesterov",
    "trust_clip",
    "adapt",
)
"""The group keys that the step functions take after the tensors, in their order."""


def foreach_lars_step(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    trust_ratios: list[Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    adapt: bool,
) -> None:
    """One LARS step with torch._foreach_* ops; copies each tensor's ratio into `trust_ratios`."""
    sums = foreach_lars_sums(params, grads, adapt)
    foreach_lars_apply(
        params,
        grads,
        momentum_buffers,
        trust_ratios,
        sums,
        lr,
        momentum,
        weight_decay,
        trust_coefficient,
        eps,
        nesterov,
        trust_clip,
        adapt,
    )


def foreach_lars_sums(params: list[Tensor], grads: list[Tensor], adapt: bool) -> Tensor:
    """The first half of foreach_lars_step: [n, 2] float64 sums of squares of each w and g (zeros
    unless adapt)."""
    if not adapt:
        return torch.zeros(len(params), 2, dtype=torch.float64, device=params[0].device)
    return sharding.sum_squares(params, grads)


def foreach_lars_apply(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    trust_ratios: list[Tensor],
    sums: Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    trust_clip: bool,
    adapt: bool,
) -> None:
    """The second half of foreach_lars_step, with ‖w‖ and ‖g‖ from `sums`."""
    if adapt:
        w_norm, g_norm = sums.sqrt().float().unbind(1)
        ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
        if trust_clip:
            ratio = torch.clamp(ratio / lr, max=1.0)
        ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
    else:
        ratio = torch.ones(len(params), device=params[0].device)

    updates = torch._foreach_add(grads, params, alpha=weight_decay)
    if adapt:
        torch._foreach_mul_(updates, ratio.unbind())
    if momentum != 0.0:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, updates)
        if nesterov:
            torch._foreach_add_(updates, momentum_buffers, alpha=momentum)
        else:
            updates = momentum_buffers
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_copy_(trust_ratios, ratio.unbind())
