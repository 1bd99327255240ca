"""Small defects, each a specification: plan's threads, GroupNorm on features, the optimizer classes' argument
rules (the config's, in the same words), `largebatch bench --help`, and a sum over a group of one. FSDP's shard
units in config.yaml are checked in test_fsdp.py, on its runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import cli_in_process

from largebatch import bench, config, dist, optim
from largebatch.bench import BENCHMARKS
from largebatch.cli import main
from largebatch.errors import UserError
from largebatch.models.norms import norm1d
from largebatch.optim import LAMB, LARS


def _planned_threads(*args: str) -> tuple[int, str]:
    result = cli_in_process("plan", "--examples", "4096", *args)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("threads "))
    return int(line.split()[1]), result.stderr


@pytest.fixture
def sixteen_cores(monkeypatch):
    """A 16-core machine, no OMP_NUM_THREADS: the rule's own answer, whatever this machine has."""
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist.os, "sched_getaffinity", lambda pid: set(range(16)))
    return monkeypatch


def test_plan_prints_the_threads_of_each_planned_process(sixteen_cores) -> None:
    assert _planned_threads()[0] == 16
    assert _planned_threads("--world-size", "2")[0] == 8
    assert _planned_threads("--world-size", "8", "--nproc-per-node", "4")[0] == 4
    assert _planned_threads("--world-size", "2", "run.threads=3")[0] == 3
    sixteen_cores.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for 2+ processes per node
    assert _planned_threads("--world-size", "2") == (1, "")


def test_plan_warns_that_plain_torchrun_would_run_one_thread(sixteen_cores) -> None:
    _, warning = _planned_threads("--world-size", "2")
    assert "plain torchrun sets OMP_NUM_THREADS=1" in warning and "not 8" in warning


def test_plan_refuses_processes_per_node_that_do_not_divide_the_world() -> None:
    result = cli_in_process(
        "plan", "--examples", "4096", "--world-size", "4", "--nproc-per-node", "3"
    )
    assert result.returncode == 2
    assert "--nproc-per-node=3 must be a positive divisor of --world-size=4" in result.stderr


@pytest.mark.parametrize("width", [2, 3, 16, 32, 48, 64, 96])
def test_group_norm_on_features_puts_two_or_more_in_every_group(width: int) -> None:
    norm = norm1d("group", width)
    assert norm.num_channels // norm.num_groups >= 2
    out = norm(torch.randn(4, width))
    assert out.std() > 0.5  # not the constant a group of one feature gives


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_a_norm_over_one_feature_is_refused_naming_model_width(kind: str) -> None:
    with pytest.raises(UserError, match="model.width=1 leaves one feature per group"):
        norm1d(kind, 1)


def test_an_mlp_of_width_16_with_group_norm_passes_the_start_check() -> None:
    result = cli_in_process("plan", "model.name=mlp", "model.norm=group", "model.width=16")
    assert result.returncode == 0, result.stderr


PARAMS = [torch.nn.Parameter(torch.ones(4, 4))]
RULES = {
    "lr": -0.1,
    "eps": -1.0,
    "momentum": 1.5,
    "betas": [0.9, 1.0],
    "weight_decay": -1.0,
    "trust_coefficient": -1.0,
    "trust_clip": -2.0,
}
"""A value breaking each rule of optim_args, as a config override would give it."""
TAKES = {LARS: ("lr", "eps", "momentum", "weight_decay", "trust_coefficient")}
TAKES[LAMB] = ("lr", "eps", "betas", "weight_decay", "trust_clip")


def _config_error(*overrides: str) -> str:
    with pytest.raises(UserError) as error:
        optim.check(config.load(None, list(overrides)).optim)
    return str(error.value)


@pytest.mark.parametrize("key", list(RULES))
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_the_optimizer_classes_refuse_what_the_config_refuses_in_the_same_words(
    key: str, impl: str
) -> None:
    value = RULES[key]
    says = _config_error(f"optim.{key}={value}").removeprefix("optim.")
    for cls in (c for c, keys in TAKES.items() if key in keys):
        kwargs = {"lr": 0.1, key: tuple(value) if key == "betas" else value}
        with pytest.raises(ValueError) as error:
            cls(PARAMS, impl=impl, **kwargs)
        assert str(error.value) == says


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_lamb_refuses_eps_zero_as_the_config_does(impl: str) -> None:
    says = _config_error("optim.name=lamb", "optim.eps=0.0").removeprefix("optim.")
    with pytest.raises(ValueError) as error:
        LAMB(PARAMS, lr=0.1, eps=0.0, impl=impl)
    assert str(error.value) == says


def test_nesterov_without_momentum_is_refused_by_lars_as_by_the_config() -> None:
    says = _config_error("optim.nesterov=true", "optim.momentum=0.0").replace("optim.", "")
    with pytest.raises(ValueError, match=says):
        LARS(PARAMS, lr=0.1, momentum=0.0, nesterov=True)


@pytest.mark.parametrize("name", ["lars", "larc", "lamb", "lambc"])
def test_the_registry_variants_refuse_a_negative_eps(name: str) -> None:
    """config.load would stop this first; the classes refuse it also when built from an OptimConfig in Python."""
    cfg = config.OptimConfig(name=name, eps=-1.0, impl="foreach")
    with pytest.raises(ValueError, match="eps=-1.0 must not be negative"):
        optim.build(torch.nn.Linear(2, 2), cfg, 0.1)


def test_bench_help_lists_every_benchmark_with_its_line(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    for name, line in BENCHMARKS.items():
        assert f"  {name}" in out and line in out


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_each_benchmarks_usage_names_its_command(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["bench", name, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: largebatch bench {name} ")


def test_every_benchmark_module_is_listed() -> None:
    """A module of largebatch/bench is a benchmark, except a helper of one, whose name starts with an underscore."""
    modules = {p.stem for p in Path(bench.__file__).parent.glob("*.py")}
    assert set(BENCHMARKS) == {name for name in modules if not name.startswith("_")}


def test_a_sum_over_a_group_of_one_calls_no_collective(monkeypatch) -> None:
    """FSDP and DeepSpeed on one process join a group of one: the step's agreement is then no gloo call (0.2 ms)."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(tdist, "all_reduce", lambda *a, **k: pytest.fail("all_reduce called"))
        values = torch.tensor([1.0, 2.0])
        assert dist.all_reduce_sum(values) is values and values.tolist() == [1.0, 2.0]
    finally:
        monkeypatch.undo()
        tdist.destroy_process_group()
