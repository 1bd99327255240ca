"""LARS and LAMB, every impl, against the papers' equations written out per tensor, and against
torch-optimizer where the two define the same update.

torch_optimizer.LARS coincides with our LARS when: dampening=0, trust_clip=False, every group with
weight_decay > 0 has adapt=True and every group with weight_decay=0 has adapt=False (it adapts
exactly the decayed groups), and no decayed tensor has an all-zero gradient (there it skips the
weight decay term too, where we still step by lr·wd·w).

torch_optimizer.Lamb coincides with our LAMB when: debias=False and bias_correction=False (its
debias rescales the step after the trust ratio, which the ratio would otherwise cancel), every
group has adapt=True (it adapts all tensors), trust_clip=None, and its clamp_value exceeds every
‖w‖ (it clamps the weight norm, not the ratio).
"""

import copy
import warnings

import pytest
import torch
import torch_optimizer

from largebatch.optim import fused
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS

STEPS = 20
IMPLS = ["foreach", "fused", "auto"]
# (shape, weight scale, gradient scale); (300, 300) spans several kernel chunks; (8, 8) starts at zero.
ADAPTED = [
    ((64, 32, 3, 3), 0.5, 1e-3),
    ((300, 300), 0.05, 1.0),
    ((17, 5), 2.0, 0.1),
    ((8, 8), 0.0, 1e-2),
]
PLAIN = [((128,), 0.1, 1e-2), ((33,), 1.0, 1e-3)]


def make_problem(seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial weights (ADAPTED then PLAIN) and one list of gradients per step."""
    gen = torch.Generator().manual_seed(seed)
    specs = ADAPTED + PLAIN
    weights = [scale * torch.randn(shape, generator=gen) for shape, scale, _ in specs]
    grads = [
        [scale * torch.randn(shape, generator=gen) for shape, _, scale in specs]
        for _ in range(STEPS)
    ]
    return weights, grads


def param_groups(
    weights: list[torch.Tensor], weight_decay: float, plain_adapt: bool = False
) -> list[dict]:
    params = [w.clone() for w in weights]
    return [
        {"params": params[: len(ADAPTED)], "weight_decay": weight_decay},
        {"params": params[len(ADAPTED) :], "weight_decay": 0.0, "adapt": plain_adapt},
    ]


def run(optimizer: torch.optim.Optimizer, grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return params


def assert_close(
    actual: list[torch.Tensor], expected: list[torch.Tensor], atol: float = 1e-6
) -> None:
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a - e).abs().max().item() <= atol, (
            f"tensor {i} {tuple(a.shape)} differs by {(a - e).abs().max()}"
        )


def lars_reference(
    weights, grads, lr, momentum, weight_decay, trust_coefficient, eps, nesterov, trust_clip
):
    """You et al. 2017 eq. 6 per tensor, with the ratio scaling the gradient before momentum."""
    w = [x.clone() for x in weights]
    m = [torch.zeros_like(x) for x in weights]
    ratios = [torch.tensor(1.0)] * len(w)
    for step_grads in grads:
        for i, g in enumerate(step_grads):
            adapt = i < len(ADAPTED)
            wd = weight_decay if adapt else 0.0
            ratio = torch.tensor(1.0)
            w_norm, g_norm = w[i].norm(), g.norm()
            if adapt and w_norm > 0 and g_norm > 0:
                ratio = trust_coefficient * w_norm / (g_norm + wd * w_norm + eps)
                if trust_clip:
                    ratio = torch.clamp(ratio / lr, max=1.0)
            scaled = ratio * (g + wd * w[i])
            m[i] = momentum * m[i] + scaled
            w[i] = w[i] - lr * (scaled + momentum * m[i] if nesterov else m[i])
            ratios[i] = ratio
    return w, ratios


def lamb_reference(
    weights, grads, lr, betas, eps, weight_decay, bias_correction, trust_clip, adapt_plain=False
):
    """You et al. 2019 Algorithm 2 per tensor."""
    beta1, beta2 = betas
    w = [x.clone() for x in weights]
    m = [torch.zeros_like(x) for x in weights]
    v = [torch.zeros_like(x) for x in weights]
    ratios = [torch.tensor(1.0)] * len(w)
    for t, step_grads in enumerate(grads, start=1):
        for i, g in enumerate(step_grads):
            adapt = i < len(ADAPTED) or adapt_plain
            wd = weight_decay if i < len(ADAPTED) else 0.0
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            u = m_hat / (v_hat.sqrt() + eps) + wd * w[i]
            ratio = torch.tensor(1.0)
            w_norm, u_norm = w[i].norm(), u.norm()
            if adapt and w_norm > 0 and u_norm > 0:
                ratio = w_norm / u_norm
                if trust_clip is not None:
                    ratio = torch.clamp(ratio, 0.0, trust_clip)
            w[i] = w[i] - lr * ratio * u
            ratios[i] = ratio
    return w, ratios


LARS_OPTIONS = [{}, {"trust_clip": True}, {"nesterov": True}]
LAMB_OPTIONS = [{}, {"bias_correction": False}, {"trust_clip": 0.5}]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", LARS_OPTIONS, ids=["plain", "trust_clip", "nesterov"])
def test_lars_follows_the_paper_equations(impl: str, options: dict) -> None:
    weights, grads = make_problem()
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8)
    optimizer = LARS(param_groups(weights, hyper["weight_decay"]), **hyper, **options, impl=impl)
    expected, _ = lars_reference(
        weights, grads, **{"nesterov": False, "trust_clip": False, **hyper, **options}
    )
    assert_close(run(optimizer, grads), expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", LAMB_OPTIONS, ids=["plain", "no_bias_correction", "trust_clip"])
def test_lamb_follows_the_paper_equations(impl: str, options: dict) -> None:
    weights, grads = make_problem()
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
    optimizer = LAMB(param_groups(weights, hyper["weight_decay"]), **hyper, **options, impl=impl)
    expected, _ = lamb_reference(
        weights, grads, **{"bias_correction": True, "trust_clip": None, **hyper, **options}
    )
    assert_close(run(optimizer, grads), expected)


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_trust_ratio_state_is_the_ratio_used_in_the_last_step(impl: str) -> None:
    weights, grads = make_problem()
    lars = LARS(
        param_groups(weights, 1e-2), lr=0.1, trust_coefficient=0.02, weight_decay=1e-2, impl=impl
    )
    lamb = LAMB(param_groups(weights, 1e-2), lr=0.01, weight_decay=1e-2, impl=impl)
    _, lars_ratios = lars_reference(weights, grads, 0.1, 0.9, 1e-2, 0.02, 1e-8, False, False)
    _, lamb_ratios = lamb_reference(weights, grads, 0.01, (0.9, 0.999), 1e-6, 1e-2, True, None)
    for optimizer, expected in ((lars, lars_ratios), (lamb, lamb_ratios)):
        params = run(optimizer, grads)
        stored = [optimizer.state[p]["trust_ratio"] for p in params]
        assert all(r.dim() == 0 and r.dtype == torch.float32 for r in stored)
        torch.testing.assert_close(torch.stack(stored), torch.stack(expected), rtol=1e-5, atol=0)
        assert all(r == 1.0 for r in stored[len(ADAPTED) :]), "adapt=False groups report ratio 1"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_torch_optimizer_lars(impl: str, nesterov: bool) -> None:
    weights, grads = make_problem()
    hyper = dict(
        lr=0.1, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.02, eps=1e-8, nesterov=nesterov
    )
    ours = LARS(param_groups(weights, 1e-2), **hyper, impl=impl)
    theirs = torch_optimizer.LARS(param_groups(weights, 1e-2), **hyper, dampening=0.0)
    assert_close(run(ours, grads), run(theirs, grads))


@pytest.mark.parametrize("impl", IMPLS)
def test_lamb_without_bias_correction_matches_torch_optimizer_lamb(impl: str) -> None:
    weights, grads = make_problem()
    hyper = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
    ours = LAMB(
        param_groups(weights, 1e-2, plain_adapt=True), **hyper, bias_correction=False, impl=impl
    )
    theirs = torch_optimizer.Lamb(
        param_groups(weights, 1e-2), **hyper, clamp_value=1e9, debias=False
    )
    assert_close(run(ours, grads), run(theirs, grads))


@pytest.mark.parametrize(
    "make",
    [
        lambda groups, impl: LARS(
            groups, lr=0.1, trust_coefficient=0.02, weight_decay=1e-2, nesterov=True, impl=impl
        ),
        lambda groups, impl: LAMB(groups, lr=0.01, weight_decay=1e-2, trust_clip=0.5, impl=impl),
    ],
    ids=["LARS", "LAMB"],
)
@pytest.mark.parametrize("saved_by, resumed_by", [("foreach", "fused"), ("fused", "foreach")])
def test_state_dict_saved_by_one_impl_resumes_in_the_other(
    make, saved_by: str, resumed_by: str
) -> None:
    weights, grads = make_problem()
    first, second = grads[: STEPS // 2], grads[STEPS // 2 :]
    original = make(param_groups(weights, 1e-2), saved_by)
    params = run(original, first)
    resumed = make(param_groups([p.detach() for p in params], 1e-2), resumed_by)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))

    def layout(optimizer):
        return [
            {k: (v.shape, v.dtype) for k, v in s.items()}
            for s in optimizer.state_dict()["state"].values()
        ]

    assert layout(resumed) == layout(original)
    assert_close(run(resumed, second), run(original, second))


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_lars_zero_weight_or_zero_gradient_has_trust_ratio_one(impl: str) -> None:
    zero_weight, zero_grad = torch.zeros(40, 30), torch.ones(40, 30)
    optimizer = LARS([zero_weight, zero_grad], lr=0.1, momentum=0.0, weight_decay=1e-2, impl=impl)
    zero_weight.grad, zero_grad.grad = torch.ones(40, 30), torch.zeros(40, 30)
    optimizer.step()
    assert [optimizer.state[p]["trust_ratio"].item() for p in (zero_weight, zero_grad)] == [
        1.0,
        1.0,
    ]
    torch.testing.assert_close(zero_weight, torch.full((40, 30), -0.1))
    torch.testing.assert_close(zero_grad, torch.full((40, 30), 1 - 0.1 * 1e-2))


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_lamb_zero_weight_or_zero_update_has_trust_ratio_one(impl: str) -> None:
    zero_weight, zero_update = torch.zeros(40, 30), torch.ones(40, 30)
    optimizer = LAMB([zero_weight, zero_update], lr=0.1, weight_decay=0.0, impl=impl)
    zero_weight.grad, zero_update.grad = torch.ones(40, 30), torch.zeros(40, 30)
    optimizer.step()
    assert [optimizer.state[p]["trust_ratio"].item() for p in (zero_weight, zero_update)] == [
        1.0,
        1.0,
    ]
    torch.testing.assert_close(zero_weight, torch.full((40, 30), -0.1 / (1 + 1e-6)))
    torch.testing.assert_close(zero_update, torch.ones(40, 30))


@pytest.mark.parametrize("optimizer_class", [LARS, LAMB])
def test_gradients_are_left_unchanged(optimizer_class) -> None:
    weights, grads = make_problem()
    optimizer = optimizer_class(
        param_groups(weights, 1e-2), lr=0.1, weight_decay=1e-2, impl="fused"
    )
    params = run(optimizer, grads[:1])
    assert_close([p.grad for p in params], grads[0], atol=0.0)


@pytest.mark.parametrize("optimizer_class", [LARS, LAMB])
def test_fused_result_does_not_depend_on_the_thread_count(optimizer_class) -> None:
    weights, grads = make_problem()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(
                run(optimizer_class(param_groups(weights, 1e-2), lr=0.01, impl="fused"), grads)
            )
    finally:
        torch.set_num_threads(threads)
    assert_close(*results, atol=0.0)


@pytest.mark.parametrize("optimizer_class", [LARS, LAMB])
def test_bf16_params_take_the_foreach_path_under_fused(optimizer_class) -> None:
    weights, grads = make_problem()
    weights, grads = (
        [w.bfloat16() for w in weights],
        [[g.bfloat16() for g in gs] for gs in grads[:3]],
    )
    results = [
        run(
            optimizer_class(param_groups(weights, 1e-2), lr=0.01, weight_decay=1e-2, impl=impl),
            grads,
        )
        for impl in ("foreach", "fused")
    ]
    assert_close(*results, atol=0.0)


@pytest.fixture
def broken_build(monkeypatch: pytest.MonkeyPatch):
    """Make the kernel build fail, as it does without a C++ compiler."""
    monkeypatch.setattr(fused, "_build", lambda: "CalledProcessError: c++ not found")
    fused._load_or_warn.cache_clear()
    yield
    fused._load_or_warn.cache_clear()


def test_auto_warns_once_and_uses_foreach_when_the_kernel_cannot_build(broken_build) -> None:
    weights, grads = make_problem()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = run(LAMB(param_groups(weights, 1e-2), lr=0.01, impl="auto"), grads[:3])
    assert len(caught) == 1 and "c++ not found" in str(caught[0].message)
    assert_close(
        auto, run(LAMB(param_groups(weights, 1e-2), lr=0.01, impl="foreach"), grads[:3]), atol=0.0
    )


def test_fused_raises_with_the_fix_when_the_kernel_cannot_build(broken_build) -> None:
    weights, grads = make_problem()
    with pytest.raises(RuntimeError, match="use impl='foreach'"):
        run(LARS(param_groups(weights, 1e-2), lr=0.1, impl="fused"), grads[:1])


def test_unknown_impl_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="auto, foreach, fused"):
        LARS([torch.zeros(3)], lr=0.1, impl="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer_class", [LARS, LAMB])
def test_cuda_params_under_fused_match_the_cpu_kernel(optimizer_class) -> None:
    weights, grads = make_problem()
    cpu = run(optimizer_class(param_groups(weights, 1e-2), lr=0.01, impl="fused"), grads)
    cuda_grads = [[g.cuda() for g in gs] for gs in grads]
    cuda = run(
        optimizer_class(param_groups([w.cuda() for w in weights], 1e-2), lr=0.01, impl="fused"),
        cuda_grads,
    )
    assert_close([p.cpu() for p in cuda], cpu, atol=1e-5)
