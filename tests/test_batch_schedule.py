"""batch.schedule: the global batch grows (ramp, gns) only at step boundaries, through accumulation, with exact sample
counts, every example once per epoch (also across a change of world size), and a resume mid-ramp that ends where
an uninterrupted run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, cli_in_process, metrics, train_in_one_job

from largebatch.batch import GlobalBatchSampler, advance, locate, plan
from largebatch.batch_schedule import FollowNoise, Ramp

LINREG = (
    f"--config={ROOT / 'tests' / 'tasks' / 'linreg.yaml'}",
    "data.name=linreg:recorded_data",
    "optim.reference_batch=128",
    "optim.scaling=linear",
)
N = 1000
"""Training examples: the runs below cross several epochs, with sizes that do not divide it."""


def test_a_ramp_is_linear_in_examples_in_whole_quanta_and_ends_at_the_global_batch():
    ramp = Ramp(start=32, final=128, ramp_samples=1500, quantum=32)
    sizes = [ramp.size(0, samples, None) for samples in range(0, 2000, 10)]
    assert sizes[0] == 32 and all(s % 32 == 0 for s in sizes) and sizes == sorted(sizes)
    assert (
        ramp.size(0, 499, None) == 32
        and ramp.size(0, 500, None) == 64
        and ramp.size(0, 1499, None) == 96
    )
    assert ramp.size(0, 1500, None) == 128


def test_gns_follows_the_noise_scale_down_to_a_quantum_never_shrinks_nor_jumps_and_stops_at_the_cap():
    follow = FollowNoise(start=32, final=128, quantum=32)
    assert follow.size(32, 0, None) == 32  # not measured yet
    assert follow.size(32, 0, 81.0) == 64
    assert follow.size(64, 0, 40.0) == 64
    assert (
        follow.size(32, 0, 1e6) == 64 and follow.size(64, 0, 1e6) == 128
    )  # at most doubling per change
    assert follow.size(64, 0, float("nan")) == 64


def test_a_changing_batch_and_a_changing_world_use_every_example_once_per_epoch():
    """Sizes from a ramp, the world size 2 → 1 → 4 on the way (a resume elsewhere): every step's batch is whole, no
    example repeats within an epoch, and an epoch leaves out only a tail shorter than the batch that followed it."""
    ramp, position, samples, seen, epochs = Ramp(32, 256, 2000, 32), (0, 0), 0, [], {}
    for world in [2] * 20 + [1] * 15 + [4] * 20:
        size = ramp.size(0, samples, None)
        indices = []
        for rank in range(world):
            batch_plan = plan(world, size, 8)
            for micro in GlobalBatchSampler(N, batch_plan, rank, 5, 1, position):
                indices.extend(micro)
        epoch, _ = locate(position, size, N)
        assert len(indices) == len(set(indices)) == size
        epochs.setdefault(epoch, []).extend(indices)
        seen.append(size)
        position, samples = advance(position, size, N), samples + size
    assert samples == sum(seen)
    for epoch, indices in epochs.items():
        assert len(indices) == len(set(indices))
        if epoch + 1 in epochs:
            assert N - len(indices) < 256


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In one 2-process job: a ramp with checkpoints, a gns run, and the ramp resumed from its step-20 checkpoint
    (mid-ramp: the batch is 80 there, on its way from 32 to 128 in quanta of world 2 × micro 8)."""
    base = tmp_path_factory.mktemp("schedules")
    ramp = (
        *LINREG,
        f"data.args={{sigma: 1.0, size: {N}, record: '{base / 'ramp_record'}'}}",
        "optim.lr=0.05",
        "batch.global_size=128",
        "batch.micro_size=8",
        "batch.schedule=ramp",
        "batch.start_size=32",
        "batch.ramp_samples=1500",
        "train.noise_scale=false",
        "train.steps=30",
        "train.checkpoint_every=5",
        "train.checkpoint_keep=10",
    )
    gns = (
        *LINREG,
        f"data.args={{sigma: 2.0, size: {N}, record: '{base / 'gns_record'}'}}",
        "optim.lr=1.0e-9",
        "batch.global_size=128",
        "batch.micro_size=16",
        "batch.schedule=gns",
        "batch.start_size=32",
        "train.steps=20",
    )
    resumed = (*ramp, f"run.resume={base / 'ramp' / 'checkpoints' / 'step_00000020'}")
    train_in_one_job(base, {"ramp": ramp, "gns": gns, "resumed": resumed})
    return base


def _steps(run: Path) -> list[dict]:
    records = metrics(run)
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return records


@pytest.mark.parametrize("name", ["ramp", "gns"])
def test_the_batch_changes_only_at_step_boundaries_through_accumulation_with_exact_counts(
    runs: Path, name: str
):
    records = _steps(runs / name)
    sizes = [r["global_batch"] for r in records]
    assert sizes[0] == 32 and sizes == sorted(sizes) and len(set(sizes)) > 1
    for r, before in zip(records, [0] + [r["samples"] for r in records]):
        assert r["samples"] - before == r["global_batch"] == 2 * r["micro_batch"] * r["accum_steps"]
    summary = json.loads((runs / name / "summary.json").read_text())
    assert (
        summary["samples"] == sum(sizes) >= (30 if name == "ramp" else 20) * 128 > sum(sizes[:-1])
    )
    assert summary["steps"] == len(records)


def test_gns_grows_to_the_measured_noise_scale(runs: Path):
    """σ = 2, |δ| = 1: B_simple = 16 · 5 + 1 = 81, so the batch settles at 64 (quanta of world 2 × micro 16)."""
    records = _steps(runs / "gns")
    assert records[-1]["global_batch"] == 64
    assert 50 < records[-1]["gns"] < 130


@pytest.mark.parametrize("name", ["ramp", "gns"])
def test_every_example_trained_on_once_per_epoch(runs: Path, name: str):
    """The indices the dataset actually served, rank by rank, cut into steps by the logged batch sizes."""
    records = _steps(runs / name)
    shares = [r["global_batch"] // 2 for r in records]
    served = [_served(runs, name, rank, shares) for rank in (0, 1)]
    epoch, used, done = [], set(), 0
    for share in shares:
        batch = [int(i) for lines in served for i in lines[done : done + share]]
        done += share
        if used & set(batch):  # a new epoch began: the last one left out less than a batch
            assert N - len(used) < len(batch)
            used = set()
        assert len(set(batch)) == len(batch)
        used |= set(batch)
        epoch.append(len(used))
    assert max(epoch) > N - 128 and done == sum(shares)


def _served(runs: Path, name: str, rank: int, shares: list[int]) -> list[str]:
    """The indices `rank` served in run `name`. Each run's are preceded by the one example of the model check; the
    ramp's file goes on with the resumed run's (same data.args), which must repeat the ramp's from step 21 on."""
    lines, ours = (runs / f"{name}_record" / f"{rank}.txt").read_text().split(), sum(shares)
    if name == "gns":
        return lines[-ours:]
    theirs = sum(shares[20:])
    check = (len(lines) - ours - theirs) // 2
    served = lines[check : check + ours]
    assert lines[-theirs:] == served[-theirs:]
    return served


def test_a_resume_mid_ramp_ends_with_the_uninterrupted_parameters(runs: Path):
    full = json.loads((runs / "ramp" / "summary.json").read_text())
    resumed = json.loads((runs / "resumed" / "summary.json").read_text())
    assert resumed["params_sha256"] == full["params_sha256"]
    sizes = [r["global_batch"] for r in _steps(runs / "ramp")]
    assert 32 < sizes[19] < sizes[-1] == 128  # the checkpoint is mid-ramp
    assert [r["loss"] for r in metrics(runs / "resumed")] == [
        r["loss"] for r in metrics(runs / "ramp")
    ][20:]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("batch.schedule=ramp", "batch.start_size=64"), "batch.ramp_samples"),
        (("batch.schedule=ramp", "batch.ramp_samples=100"), "batch.start_size"),
        (
            (
                "batch.schedule=ramp",
                "batch.start_size=48",
                "batch.micro_size=32",
                "batch.ramp_samples=100",
            ),
            "multiple",
        ),
        (("batch.schedule=gns", "batch.start_size=64"), "train.noise_scale=true"),
        (
            ("batch.schedule=gns", "batch.start_size=64", "train.noise_scale=true"),
            "at least 2 × batch.micro_size",
        ),
        (
            (
                "batch.schedule=ramp",
                "batch.start_size=64",
                "batch.ramp_samples=100",
                "batch.micro_size=auto",
            ),
            "micro_size",
        ),
    ],
)
def test_an_impossible_schedule_is_one_line_and_exit_2(overrides: tuple[str, ...], message: str):
    result = cli_in_process(
        "plan", "--config", str(ROOT / "configs" / "quickstart.yaml"), *overrides
    )
    assert (
        result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    )
