"""batch.schedule on engine.name=deepspeed (CPU, gloo, 2 processes): a ramp on every ZeRO stage (and on FSDP2, in the
same job) trains as on DDP, changes the batch only at step boundaries, serves every example once per epoch, keeps
DeepSpeed's own sample count, and resumes mid-ramp to the uninterrupted parameters; gns runs where DeepSpeed measures
the noise scale (stages 0-1) and is refused where not.

All trainings run in one torchrun job (DeepSpeed's initialisation is slow on CPU), on the 16-weight linear
regression of tests/tasks/: each ramp trains on 6 × 128 examples, in 12 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_in_process, metrics, relative, train_in_one_job

N = 500
"""Training examples: the ramp (768 examples) crosses into a second epoch with sizes that do not divide it."""
ENGINES = {
    "ddp": ("engine.name=ddp",),
    **{
        f"zero{stage}": ("engine.name=deepspeed", f"engine.zero_stage={stage}")
        for stage in range(4)
    },
    "fsdp": ("engine.name=fsdp",),
}
DEEPSPEED = [name for name in ENGINES if name.startswith("zero")]
LINREG = (
    f"--config={ROOT / 'tests' / 'tasks' / 'linreg.yaml'}",
    "data.name=linreg:recorded_data",
    "optim.reference_batch=128",
    "optim.scaling=linear",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In one 2-process job: per engine (DDP the reference), a ramp 32 → 128 (quanta of world 2 × micro 8)
    checkpointed at step 6, mid-ramp, and the ramp resumed from there; and a gns run at ZeRO stage 1."""
    base = tmp_path_factory.mktemp("ds_schedules")
    table = {}
    for engine, keys in ENGINES.items():
        ramp = (
            *LINREG,
            *keys,
            f"data.args={{sigma: 1.0, size: {N}, record: '{base / f'ramp-{engine}_record'}'}}",
            "optim.lr=0.05",
            "batch.global_size=128",
            "batch.micro_size=8",
            "batch.schedule=ramp",
            "batch.start_size=32",
            "batch.ramp_samples=600",
            "train.noise_scale=false",
            "train.steps=6",
            "train.checkpoint_every=6",
            "train.checkpoint_keep=4",
        )
        checkpoint = base / f"ramp-{engine}" / "checkpoints" / "step_00000006"
        table[f"ramp-{engine}"] = ramp
        table[f"resumed-{engine}"] = (*ramp, f"run.resume={checkpoint}")
    table["gns"] = (
        *LINREG,
        *ENGINES["zero1"],
        f"data.args={{sigma: 2.0, size: 1000, record: '{base / 'gns_record'}'}}",
        "optim.lr=1.0e-9",
        "batch.global_size=128",
        "batch.micro_size=16",
        "batch.schedule=gns",
        "batch.start_size=32",
        "train.steps=8",
    )
    train_in_one_job(base, table)
    return base


def _steps(run: Path) -> list[dict]:
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return records


def _global_samples(checkpoint: Path) -> int:
    """DeepSpeed's own count of trained examples, as its checkpoint keeps it."""
    states = sorted((checkpoint / "deepspeed").glob("*model_states.pt"))[0]  # every rank's holds it
    return torch.load(states, map_location="cpu", weights_only=False)["global_samples"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_ramp_changes_the_batch_only_at_step_boundaries_with_exact_counts(
    runs: Path, engine: str
):
    records = _steps(runs / f"ramp-{engine}")
    sizes = [r["global_batch"] for r in records]
    assert sizes[0] == 32 and sizes == sorted(sizes) and sizes[-1] == 128 and len(set(sizes)) > 2
    for r, before in zip(records, [0] + [r["samples"] for r in records]):
        assert r["samples"] - before == r["global_batch"] == 2 * r["micro_batch"] * r["accum_steps"]
    summary = json.loads((runs / f"ramp-{engine}" / "summary.json").read_text())
    assert summary["samples"] == sum(sizes) and summary["steps"] == len(records) == 12


@pytest.mark.parametrize("engine", DEEPSPEED)
def test_deepspeed_counts_the_examples_the_ramp_trained_on(runs: Path, engine: str):
    """set_train_batch_size keeps DeepSpeed's `global_samples` equal to ours, at the mid-ramp checkpoint and after
    the resume, at the end."""
    records = _steps(runs / f"ramp-{engine}")
    checkpoints = runs / f"ramp-{engine}" / "checkpoints"
    assert _global_samples(checkpoints / "step_00000006") == records[5]["samples"]
    resumed = runs / f"resumed-{engine}" / "checkpoints" / "step_00000012"
    assert _global_samples(resumed) == records[-1]["samples"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_ramp_trains_on_every_example_once_per_epoch(runs: Path, engine: str):
    """The indices the dataset served, rank by rank, cut into steps by the logged batch sizes. The record goes on
    with the resumed run's (same data.args), which must repeat the ramp's from step 7 on."""
    shares = [r["global_batch"] // 2 for r in _steps(runs / f"ramp-{engine}")]
    ours, theirs = sum(shares), sum(shares[6:])
    served = []
    for rank in (0, 1):
        lines = (runs / f"ramp-{engine}_record" / f"{rank}.txt").read_text().split()
        check = (
            len(lines) - ours - theirs
        ) // 2  # each run's model check serves an example or two first
        served.append(lines[check : check + ours])
        assert lines[-theirs:] == served[-1][-theirs:]
    used, done, epochs = set(), 0, 1
    for share in shares:
        batch = [int(i) for lines in served for i in lines[done : done + share]]
        done += share
        if used & set(batch):  # a new epoch began: the last one left out less than a batch
            assert N - len(used) < len(batch)
            used, epochs = set(), epochs + 1
        assert len(set(batch)) == len(batch)
        used |= set(batch)
    assert epochs == 2 and done == ours


@pytest.mark.parametrize("engine", ENGINES)
def test_a_resume_mid_ramp_ends_with_the_uninterrupted_parameters(runs: Path, engine: str):
    full = json.loads((runs / f"ramp-{engine}" / "summary.json").read_text())
    resumed = json.loads((runs / f"resumed-{engine}" / "summary.json").read_text())
    assert resumed["params_sha256"] == full["params_sha256"]
    sizes = [r["global_batch"] for r in _steps(runs / f"ramp-{engine}")]
    assert 32 < sizes[5] < sizes[-1]  # the checkpoint is mid-ramp
    assert [r["loss"] for r in metrics(runs / f"resumed-{engine}")] == [
        r["loss"] for r in metrics(runs / f"ramp-{engine}")
    ][6:]


@pytest.mark.parametrize("engine", [name for name in ENGINES if name != "ddp"])
def test_a_ramp_trains_as_on_the_ddp_engine(runs: Path, engine: str):
    """Same losses step by step: the changed accumulation reaches DeepSpeed's (and FSDP's) gradients as DDP's."""
    assert relative(metrics(runs / f"ramp-{engine}"), metrics(runs / "ramp-ddp"), "loss") < 1e-5


def test_gns_on_zero_stage_1_grows_the_batch_with_the_noise_scale(runs: Path):
    """σ = 2, |δ| = 1: B_simple = 81, so the batch grows from 32 to 64 (quanta of world 2 × micro 16)."""
    records = _steps(runs / "gns")
    sizes = [r["global_batch"] for r in records]
    assert sizes[0] == 32 and sizes == sorted(sizes) and sizes[-1] == 64
    for r, before in zip(records, [0] + [r["samples"] for r in records]):
        assert r["samples"] - before == r["global_batch"]


def test_gns_where_deepspeed_cannot_measure_the_noise_scale_is_one_line_and_exit_2():
    result = cli_in_process(
        "plan",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "engine.name=deepspeed",
        "engine.zero_stage=2",
        "batch.schedule=gns",
        "batch.start_size=64",
        "batch.micro_size=32",
        "train.noise_scale=true",
    )
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    assert "train.noise_scale" in result.stderr and "engine.zero_stage=2" in result.stderr
