"""LARS and LAMB on FSDP2-sharded parameters take the trust ratios of whole parameters, from one all-reduce a step.

The comparisons run in one 2-process torchrun job (gloo, CPU): this file is also the worker (`python -m
torch.distributed.run ... test_sharded_optim.py OUT`). Each process trains a model wrapped with `fully_shard` and the
same model unsharded, on the same full batch: FSDP2 averages identical gradients over the ranks, so both see the same
gradient, and only the optimizer's handling of the shards can make them differ. Rank 0 saves what the tests check.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

from largebatch.dist import torchrun_command
from largebatch.optim import fused, sharding
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
OPTIMIZERS: dict[str, Callable[[list[dict], str], torch.optim.Optimizer]] = {
    "lamb": lambda groups, impl: LAMB(groups, lr=0.02, impl=impl),
    "lambc": lambda groups, impl: LAMB(groups, lr=0.02, trust_clip=0.1, impl=impl),
    "lamb_no_bias_correction": lambda groups, impl: LAMB(
        groups, lr=0.02, bias_correction=False, impl=impl
    ),
    "lars": lambda groups, impl: LARS(groups, lr=0.1, trust_coefficient=0.02, impl=impl),
    "larc": lambda groups, impl: LARS(
        groups, lr=0.1, trust_coefficient=0.02, trust_clip=True, impl=impl
    ),
    "lars_nesterov": lambda groups, impl: LARS(
        groups, lr=0.1, trust_coefficient=0.02, nesterov=True, impl=impl
    ),
}
IMPLS = ("foreach", "fused")
CASES = [f"{name}/{impl}" for name in OPTIMIZERS for impl in IMPLS]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """What rank 0 of the 2-process job saved."""
    out = tmp_path_factory.mktemp("sharded") / "results.pt"
    done = subprocess.run(
        [
            *torchrun_command(2),
            __file__,
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


@pytest.mark.parametrize("case", CASES)
def test_sharded_parameters_follow_the_unsharded_run(results: dict, case: str) -> None:
    run = results[case]
    for sharded, whole in zip(run["params"], run["reference_params"]):
        torch.testing.assert_close(sharded, whole, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_trust_ratios_are_those_of_whole_parameters_at_every_step(results: dict, case: str) -> None:
    run = results[case]
    torch.testing.assert_close(run["ratios"], run["reference_ratios"], rtol=1e-5, atol=0.0)
    assert (run["ratios"][:, run["adapted"]] != 1.0).any(), "not only ratios of 1"


@pytest.mark.parametrize("case, clip", [("lambc/fused", 0.1), ("larc/fused", 1.0)])
def test_the_clipped_variants_clip_some_ratios(results: dict, case: str, clip: float) -> None:
    ratios = results[case]["ratios"][:, results[case]["adapted"]]
    assert (ratios == clip).any() and (ratios < clip).any()


@pytest.mark.parametrize("case", CASES)
def test_one_all_reduce_per_step_and_none_without_sharded_parameters(
    results: dict, case: str
) -> None:
    assert results[case]["all_reduces"] == [1] * STEPS
    assert results[case]["reference_all_reduces"] == [0] * STEPS


@pytest.mark.parametrize("case", CASES)
def test_trust_ratio_state_is_a_plain_scalar_equal_on_every_rank(results: dict, case: str) -> None:
    run = results[case]
    assert run["ratio_types"] == {("Tensor", 0, torch.float32)}
    assert run["ratios_equal_on_every_rank"]
    assert run["buffer_types"] == {"DTensor"}, (
        "moments and momentum buffers stay sharded like their parameters"
    )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreach_and_fused_agree_on_sharded_parameters(results: dict, name: str) -> None:
    """Ratios to 1e-6; parameters to 1e-6 absolute, as unsharded (the two round the Adam and LARS updates apart)."""
    foreach, fused_run = results[f"{name}/foreach"], results[f"{name}/fused"]
    torch.testing.assert_close(foreach["ratios"], fused_run["ratios"], rtol=1e-6, atol=0.0)
    for a, b in zip(foreach["params"], fused_run["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_ratios_of_local_shards_differ_from_those_of_whole_parameters(
    results: dict, name: str
) -> None:
    """The failure the reduction prevents: the unsharded optimizer on each rank's shards as if they were parameters."""
    naive, whole = results[f"naive/{name}"]
    assert ((naive - whole).abs() / whole).max() > 0.05


def test_fsdp2_local_shards_are_fusable_including_empty_ones(results: dict) -> None:
    assert results["fusable"] == [True, True]
    assert 0 in results["local_numels"][1], "rank 1 holds an empty shard of the (1, 9) weight"


def test_replicated_rows_count_once_and_plain_rows_are_not_reduced(results: dict) -> None:
    """reduce_sums on rank r with rows (sharded, replicated, plain) all filled with r + 1."""
    assert results["reduced"] == [
        [[3.0, 3.0], [1.0, 1.0], [1.0, 1.0]],
        [[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]],
    ]


def test_a_2d_mesh_is_refused_with_the_fix(results: dict) -> None:
    error = results["2d_mesh_error"]
    assert "2-D device mesh" in error and "shard with fully_shard over one mesh dimension" in error


@pytest.mark.parametrize(
    "options", [{}, {"trust_clip": True}, {"nesterov": True}, {"momentum": 0.0}, {"adapt": False}]
)
def test_lars_split_kernel_equals_the_combined_one_bit_for_bit(options: dict) -> None:
    kernels = fused.load()
    hyper = {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-2,
        "trust_coefficient": 0.02,
        "eps": 1e-8,
        "nesterov": False,
        "trust_clip": False,
        "adapt": True,
        **options,
    }
    results = []
    for split in (False, True):
        params, grads = whole_tensors()
        buffers = [torch.full_like(p, 0.01) for p in params] if hyper["momentum"] else []
        ratios = [torch.ones(()) for _ in params]
        if split:
            sums = kernels.lars_sums(params, grads, hyper["adapt"])
            kernels.lars_apply(params, grads, buffers, ratios, sums, *hyper.values())
        else:
            kernels.lars_step(params, grads, buffers, ratios, *hyper.values())
        results.append(params + buffers + ratios)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize(
    "options", [{}, {"bias_correction": False}, {"trust_clip": 0.5}, {"adapt": False}]
)
def test_lamb_split_kernel_equals_the_combined_one_bit_for_bit(options: dict) -> None:
    kernels = fused.load()
    adam = {
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-6,
        "weight_decay": 1e-2,
        "bias_correction": True,
    }
    adam.update((k, v) for k, v in options.items() if k in adam)
    ratio = {"trust_clip": None, "adapt": True}
    ratio.update((k, v) for k, v in options.items() if k in ratio)
    results = []
    for split in (False, True):
        params, grads = whole_tensors()
        exp_avgs, exp_avg_sqs = [0.1 * g for g in grads], [g * g for g in grads]
        steps, ratios = [torch.tensor(3.0) for _ in params], [torch.ones(()) for _ in params]
        if split:
            sums = kernels.lamb_sums(params, grads, exp_avgs, exp_avg_sqs, steps, *adam.values())
            kernels.lamb_apply(
                params,
                exp_avgs,
                exp_avg_sqs,
                steps,
                ratios,
                sums,
                0.01,
                *adam.values(),
                *ratio.values(),
            )
        else:
            kernels.lamb_step(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                steps,
                ratios,
                0.01,
                *adam.values(),
                *ratio.values(),
            )
        results.append(params + exp_avgs + exp_avg_sqs + steps + ratios)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def whole_tensors() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights and gradients: several kernel chunks (300 × 300), small, empty, and an all-zero weight."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 300), (17, 5), (0, 4), (8, 8)]
    params = [0.05 * torch.randn(shape, generator=gen) for shape in shapes]
    params[-1].zero_()
    return params, [1e-2 * torch.randn(shape, generator=gen) for shape in shapes]


def make_model() -> nn.Sequential:
    """Layers of odd sizes: (231, 300) spans several kernel chunks per shard, (1, 9) leaves rank 1 an empty shard."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(300, 231),
        nn.Tanh(),
        nn.Linear(231, 9),
        nn.Tanh(),
        nn.Linear(9, 1),
        nn.Tanh(),
        nn.Linear(1, 5),
    )


def param_groups(model: nn.Module) -> list[dict]:
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 0.01},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adapt": False},
    ]


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 as usual: each layer, then the root."""
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def backward(model: nn.Module) -> None:
    """The same full batch on every rank."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 300, generator=gen), torch.randn(16, 5, generator=gen)
    model.zero_grad(set_to_none=True)
    ((model(x) - y) ** 2).mean().backward()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def train(name: str, impl: str, mesh) -> dict:
    """STEPS steps of the sharded model and of the unsharded one; their parameters, ratios and collectives."""
    run: dict = {
        "all_reduces": [],
        "reference_all_reduces": [],
        "ratios": [],
        "reference_ratios": [],
    }
    models = {"": make_model(), "reference_": make_model()}
    shard(models[""], mesh)
    optimizers = {key: OPTIMIZERS[name](param_groups(model), impl) for key, model in models.items()}
    for _ in range(STEPS):
        for key, model in models.items():
            backward(model)
            with mock.patch("torch.distributed.all_reduce", wraps=dist.all_reduce) as all_reduce:
                optimizers[key].step()
            run[f"{key}all_reduces"].append(all_reduce.call_count)
            state = optimizers[key].state
            run[f"{key}ratios"].append(
                torch.stack([state[p]["trust_ratio"] for p in model.parameters()])
            )
    for key, model in models.items():
        run[f"{key}params"] = [full(p).detach() for p in model.parameters()]
        run[f"{key}ratios"] = torch.stack(run[f"{key}ratios"])
    run["adapted"] = [p.ndim > 1 for p in models[""].parameters()]
    states = [optimizers[""].state[p] for p in models[""].parameters()]
    run["ratio_types"] = {
        (type(s["trust_ratio"]).__name__, s["trust_ratio"].dim(), s["trust_ratio"].dtype)
        for s in states
    }
    run["buffer_types"] = {
        type(v).__name__ for s in states for k, v in s.items() if k not in ("step", "trust_ratio")
    }
    gathered = [None, None]
    dist.all_gather_object(gathered, run["ratios"])
    run["ratios_equal_on_every_rank"] = torch.equal(*gathered)
    return run


def naive_ratios(name: str, mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """First-step ratios of the unsharded optimizer on this rank's shards as plain tensors, and the correct ones."""
    model = shard(make_model(), mesh)
    backward(model)
    weights = [p for p in model.parameters() if p.ndim > 1 and p.to_local().numel() > 0]
    shards = [nn.Parameter(p.to_local().clone()) for p in weights]
    for s, p in zip(shards, weights):
        s.grad = p.grad.to_local().clone()
    naive = OPTIMIZERS[name]([{"params": shards, "weight_decay": 0.01}], "fused")
    correct = OPTIMIZERS[name](param_groups(model), "fused")
    naive.step()
    correct.step()
    return (
        torch.stack([naive.state[s]["trust_ratio"] for s in shards]),
        torch.stack([correct.state[p]["trust_ratio"] for p in weights]),
    )


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    results = {case: train(*case.split("/"), mesh) for case in CASES}
    results.update({f"naive/{name}": naive_ratios(name, mesh) for name in ("lamb", "lars")})

    model = shard(make_model(), mesh)
    backward(model)
    local = [(p.to_local(), p.grad.to_local()) for p in model.parameters()]
    results["fusable"] = [None, None]
    dist.all_gather_object(
        results["fusable"], fused.load().fusable([[w for w, _ in local], [g for _, g in local]])
    )
    results["local_numels"] = [None, None]
    dist.all_gather_object(results["local_numels"], [w.numel() for w, _ in local])

    rows = [
        distribute_tensor(torch.ones(4), mesh, [Shard(0)]),
        distribute_tensor(torch.ones(4), mesh, [Replicate()]),
        torch.ones(4),
    ]
    results["reduced"] = [None, None]
    dist.all_gather_object(
        results["reduced"], sharding.reduce_sums(rows, torch.full((3, 2), rank + 1.0)).tolist()
    )

    mesh_2d = init_device_mesh("cpu", (1, 2))
    param = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh_2d, [Replicate(), Shard(0)]))
    param.grad = torch.ones_like(param)
    try:
        LAMB([param], lr=0.01).step()
    except ValueError as exc:
        results["2d_mesh_error"] = str(exc)

    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
