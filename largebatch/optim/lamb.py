"""LAMB: Adam with a layer-wise trust ratio.

You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
https://arxiv.org/abs/1904.00962
"""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from largebatch import optim_args
from largebatch.optim import fused, sharding


class LAMB(Optimizer):
    """Adam whose update for each tensor is rescaled to that tensor's norm (Algorithm 2).

    For a tensor w with gradient g at step t, in a group with ``adapt=True`` (the default)::

        m = β1·m + (1-β1)·g,  v = β2·v + (1-β2)·g²
        m̂ = m / (1-β1^t),  v̂ = v / (1-β2^t)   (m̂ = m, v̂ = v with bias_correction=False)
        u = m̂ / (√v̂ + eps) + wd·w
        ratio = ‖w‖ / ‖u‖, or 1 where ‖w‖ or ‖u‖ is 0; clamped to [0, trust_clip] if set
        w = w - lr·ratio·u

    Implementations disagree on which tensors adapt and on clamping: apex FusedLAMB and timm adapt
    only tensors with weight decay (timm: unless always_adapt); DeepSpeed and torch-optimizer adapt
    all. DeepSpeed clamps the ratio to [0.01, 10]; torch-optimizer clamps ‖w‖ to [0, 10] instead
    (the paper's φ) and skips bias correction by default; apex does not clamp; timm's lambc clamps
    the ratio at 1. Here every group adapts unless its ``adapt`` key is False (give biases and norm
    weights adapt=False and weight_decay=0), bias correction is on, and there is no clamp;
    trust_clip=10 gives DeepSpeed's upper bound. Gradients are not clipped here: clip the global
    norm before step().

    After each step ``state[p]["trust_ratio"]`` is the ratio used, a 0-d tensor (no host sync).
    Parameters may be DTensors sharded over a 1-D device mesh (FSDP2's fully_shard): the norms are
    then of the whole parameter, from one all-reduce per step (largebatch.optim.sharding), and the
    ratio is a plain tensor, the same on every process; the moments are DTensors like the parameter.
    ``impl``: "foreach" uses torch._foreach_* ops on any device; "fused" uses a C++ kernel for
    contiguous fp32 CPU tensors and foreach for the rest; "auto" is fused if the kernel builds,
    else foreach with one warning. State is the same for every impl.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        trust_clip: float | None = None,
        impl: str = "auto",
    ) -> None:
        optim_args.check(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_clip=trust_clip
        )
        optim_args.check_positive_eps("lamb", eps)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
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
        params, grads, exp_avgs, exp_avg_sqs, steps, trust_ratios = self._local_tensors(params)
        kernels = fused.kernels_for(self.impl, params, [grads, exp_avgs, exp_avg_sqs])
        (kernels.lamb_step if kernels else foreach_lamb_step)(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            trust_ratios,
            group["lr"],
            *_adam(group),
            group["trust_clip"],
            group["adapt"],
        )

    def _first_pass(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[Tensor, Callable[[Tensor], None]]:
        """Count steps, update the moments and sum the squares of w and u over the local shards;
        returns the [n, 2] sums and the second pass, to call with the sums reduced over the shards."""
        params, grads, exp_avgs, exp_avg_sqs, steps, trust_ratios = self._local_tensors(params)
        adam = _adam(group)
        lr, trust_clip, adapt = group["lr"], group["trust_clip"], group["adapt"]
        kernels = fused.kernels_for(self.impl, params, [grads, exp_avgs, exp_avg_sqs])
        if kernels:
            sums = kernels.lamb_sums(params, grads, exp_avgs, exp_avg_sqs, steps, *adam)
            return sums, lambda reduced: kernels.lamb_apply(
                params,
                exp_avgs,
                exp_avg_sqs,
                steps,
                trust_ratios,
                reduced,
                lr,
                *adam,
                trust_clip,
                adapt,
            )
        sums, updates = foreach_lamb_sums(params, grads, exp_avgs, exp_avg_sqs, steps, *adam)
        return sums, lambda reduced: foreach_lamb_apply(
            params, updates, trust_ratios, reduced, lr, trust_clip, adapt
        )

    def _local_tensors(self, params: list[Tensor]) -> tuple[list[Tensor], ...]:
        """Params, grads, exp_avgs, exp_avg_sqs (this process's shards of DTensors), steps and trust ratios."""
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("LAMB does not support sparse gradients")
        states = [self._state(p) for p in params]
        return (
            [sharding.local(p) for p in params],
            [sharding.local(g) for g in grads],
            [sharding.local(state["exp_avg"]) for state in states],
            [sharding.local(state["exp_avg_sq"]) for state in states],
            [state["step"] for state in states],
            [state["trust_ratio"] for state in states],
        )

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
            state["trust_ratio"] = torch.ones((), device=p.device)
        return state


def _adam(group: dict[str, Any]) -> tuple[float, float, float, float, bool]:
    """beta1, beta2, eps, weight_decay and bias_correction of a param group."""
    return (*group["betas"], group["eps"], group["weight_decay"], group["bias_correction"])


def foreach_lamb_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    trust_ratios: list[Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    trust_clip: float | None,
    adapt: bool,
) -> None:
    """One LAMB step with torch._foreach_* ops; counts `steps` and copies ratios into `trust_ratios`."""
    sums, updates = foreach_lamb_sums(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        beta1,
        beta2,
        eps,
        weight_decay,
        bias_correction,
    )
    foreach_lamb_apply(params, updates, trust_ratios, sums, lr, trust_clip, adapt)


def foreach_lamb_sums(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> tuple[Tensor, list[Tensor]]:
    """The first half of foreach_lamb_step: counts `steps`, updates the moments; returns the [n, 2]
    float64 sums of squares of each w and u, and the updates u."""
    torch._foreach_add_(steps, 1.0)
    if bias_correction:
        bias_correction1 = [1.0 - beta1 ** step.item() for step in steps]
        bias_correction2 = [1.0 - beta2 ** step.item() for step in steps]
    else:
        bias_correction1 = bias_correction2 = [1.0] * len(steps)

    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(bc) for bc in bias_correction2])
    torch._foreach_add_(denom, eps)
    updates = torch._foreach_div(exp_avgs, bias_correction1)
    torch._foreach_div_(updates, denom)
    if weight_decay != 0.0:
        torch._foreach_add_(updates, params, alpha=weight_decay)
    return sharding.sum_squares(params, updates), updates


def foreach_lamb_apply(
    params: list[Tensor],
    updates: list[Tensor],
    trust_ratios: list[Tensor],
    sums: Tensor,
    lr: float,
    trust_clip: float | None,
    adapt: bool,
) -> None:
    """The second half of foreach_lamb_step: w -= lr·ratio·u with ratio = ‖w‖ / ‖u‖ from `sums`."""
    if adapt:
        w_norm, u_norm = sums.sqrt().float().unbind(1)
        ratio = w_norm / u_norm
        if trust_clip is not None:
            ratio = torch.clamp(ratio, 0.0, trust_clip)
        ratio = torch.where((w_norm > 0) & (u_norm > 0), ratio, 1.0)
        torch._foreach_mul_(updates, ratio.unbind())
    else:
        ratio = torch.ones(len(params), device=params[0].device)
    torch._foreach_add_(params, updates, alpha=-lr)
    torch._foreach_copy_(trust_ratios, ratio.unbind())
