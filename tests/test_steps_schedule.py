"""batch.schedule=steps: the global batch changes by integer factors at thresholds of examples (or tokens) trained on,
honoured exactly, through accumulation, on the constant-batch run's order of examples, with the LR (and β2, weight
decay) following each change and a resume between two thresholds ending where an uninterrupted run does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_in_process, metrics, train_in_one_job
from torch import nn

import largebatch
from largebatch import config
from largebatch.batch_schedule import Steps, parse_thresholds
from largebatch.data import ArrayDataset

N = 512
"""Training examples: a multiple of every size, and every threshold a multiple of the last size, so no epoch's tail
is dropped and the steps run sees the examples in the constant run's order."""
THRESHOLDS = ((0, 32), (256, 64), (768, 128))
LINREG = (
    f"--config={ROOT / 'tests' / 'tasks' / 'linreg.yaml'}",
    "data.name=linreg:recorded_data",
    "optim.reference_batch=128",
    "optim.scaling=linear",
    "optim.lr=0.05",
    "batch.micro_size=8",
    "train.noise_scale=false",
)


def test_thresholds_read_k_m_g_suffixes_and_a_threshold_is_honoured_at_exactly_its_count():
    assert parse_thresholds("0:64 200k:128 1.5M:256,2G:512") == (
        (0, 64),
        (200_000, 128),
        (1_500_000, 256),
        (2_000_000_000, 512),
    )
    steps = Steps(parse_thresholds("0:64 200k:128 1M:256"))
    assert [steps.size(0, s, None) for s in (0, 199_999, 200_000, 999_999, 10**6, 10**9)] == [
        64,
        64,
        128,
        128,
        256,
        256,
    ]


def test_token_thresholds_become_the_first_whole_example_count_at_or_past_them():
    cfg = config.load(
        ROOT / "configs" / "gpt-char.yaml",
        [
            "batch.schedule=steps",
            "batch.thresholds=0:32 100k:64 1M:128",
            "batch.threshold_unit=tokens",
            "batch.global_size=128",
        ],
    )  # 64 tokens per example: 100000 / 64 = 1562.5
    steps = Steps.of(cfg, 128, 32)
    assert steps.changes == ((0, 32), (1563, 64), (15625, 128))
    assert steps.size(0, 1562, None) == 32 and steps.size(0, 1563, None) == 64
    assert "64 from 1563 examples (100000 tokens)" in steps.describe()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("batch.thresholds=0:64 1k:96 2k:512",), "64 → 96 is not an integer-factor change"),
        (("batch.thresholds=0:64 1k:64 2k:512",), "64 → 64 is not an integer-factor change"),
        (("batch.thresholds=100:64 1k:512",), "must start at 0"),
        (("batch.thresholds=0:64 2k:128 1k:512",), "make them increase"),
        (("batch.thresholds=0:64 1x:512",), "is not count:size"),
        (("batch.thresholds=0:64 1k:256",), "set batch.global_size=256 (the last size)"),
        (
            ("batch.thresholds=0:32 1k:512", "batch.micro_size=64"),
            "must be multiples of world × micro-batch = 1 × 64",
        ),
        (
            ("batch.threshold_unit=tokens", "batch.thresholds=0:64 1k:512"),
            "data.name=digits has not",
        ),
        ((), "batch.schedule=steps needs batch.thresholds"),
        (("batch.thresholds=0:64 1k:512", "batch.start_size=64"), "batch.start_size is ignored"),
    ],
)
def test_an_impossible_steps_schedule_is_one_line_and_exit_2(overrides, message):
    result = cli_in_process(
        "plan",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "batch.schedule=steps",
        *overrides,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert message in lines[0]


def test_plan_prints_the_schedule():
    result = cli_in_process(
        "plan",
        "--config",
        str(ROOT / "configs" / "quickstart.yaml"),
        "batch.schedule=steps",
        "batch.thresholds=0:64 20k:128 100k:512",
    )
    assert result.returncode == 0, result.stderr
    assert "64 from 0 examples; 128 from 20000 examples; 512 from 100000 examples" in result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """In one 2-process job: the steps schedule with checkpoints (step 10 lies between the thresholds 256 and 768), the
    same data at a constant batch of 32, and the steps run resumed from its step-10 checkpoint."""
    base = tmp_path_factory.mktemp("steps")
    steps = (
        *LINREG,
        f"data.args={{sigma: 1.0, size: {N}, record: '{base / 'steps_record'}'}}",
        "batch.global_size=128",
        "batch.schedule=steps",
        "batch.thresholds=" + " ".join(f"{count}:{size}" for count, size in THRESHOLDS),
        "train.steps=12",
        "train.checkpoint_every=5",
        "train.checkpoint_keep=10",
    )
    constant = (
        *LINREG,
        f"data.args={{sigma: 1.0, size: {N}, record: '{base / 'constant_record'}'}}",
        "batch.global_size=32",
        "train.steps=48",
    )
    resumed = (*steps, f"run.resume={base / 'steps' / 'checkpoints' / 'step_00000010'}")
    train_in_one_job(base, {"steps": steps, "constant": constant, "resumed": resumed})
    return base


def test_each_threshold_is_honoured_exactly_in_examples_through_accumulation(runs: Path):
    records = metrics(runs / "steps")
    before = [0] + [r["samples"] for r in records[:-1]]
    expected = [next(s for c, s in reversed(THRESHOLDS) if start >= c) for start in before]
    assert [r["global_batch"] for r in records] == expected
    assert [b for b, r in zip(before, records) if r["global_batch"] != expected[0]][0] == 256
    assert before[[r["global_batch"] for r in records].index(128)] == 768
    for r, start in zip(records, before):
        assert r["samples"] - start == r["global_batch"] == 2 * r["micro_batch"] * r["accum_steps"]
        assert r["micro_batch"] == 8
        assert r["lr"] == pytest.approx(0.05 * r["global_batch"] / 128)  # linear rule at each size
    assert records[-1]["samples"] == 12 * 128


def _global_order(record: Path, sizes: list[int], resumed_from: int | None = None) -> list[int]:
    """The examples of each step in the global batch's order (rank 0's share, then rank 1's), from the indices each
    rank served. Each run's are preceded by the examples of its start's checks; the steps run's file goes on with the
    resumed run's (same data.args), which must repeat the steps run's from step `resumed_from` + 1 on."""
    ours = sum(sizes) // 2
    theirs = sum(sizes[resumed_from:]) // 2 if resumed_from else 0
    served = []
    for rank in (0, 1):
        lines = (record / f"{rank}.txt").read_text().split()
        checks = (len(lines) - ours - theirs) // (2 if theirs else 1)
        served.append(lines[checks : checks + ours])
        assert lines[len(lines) - theirs :] == served[-1][ours - theirs :]
    order = []
    done = 0
    for size in sizes:
        share = size // 2
        order += [int(i) for lines in served for i in lines[done : done + share]]
        done += share
    return order


def test_the_steps_run_trains_on_the_constant_runs_examples_in_its_order(runs: Path):
    steps_sizes = [r["global_batch"] for r in metrics(runs / "steps")]
    constant_sizes = [r["global_batch"] for r in metrics(runs / "constant")]
    ours = _global_order(runs / "steps_record", steps_sizes, 10)
    theirs = _global_order(runs / "constant_record", constant_sizes)
    assert len(ours) == len(theirs) == 3 * N and ours == theirs
    assert sorted(ours[:N]) == list(range(N))  # each epoch every example once


def test_a_resume_between_two_thresholds_ends_with_the_uninterrupted_parameters(runs: Path):
    full = json.loads((runs / "steps" / "summary.json").read_text())
    resumed = json.loads((runs / "resumed" / "summary.json").read_text())
    assert resumed["params_sha256"] == full["params_sha256"]
    records = metrics(runs / "steps")
    assert records[9]["global_batch"] == 64 and records[9]["samples"] == 384  # between 256 and 768
    assert [r["loss"] for r in metrics(runs / "resumed")] == [r["loss"] for r in records[10:]]


def test_lr_beta2_and_weight_decay_follow_each_change_through_the_python_api(tmp_path, capsys):
    """AdamW with zero gradients only decays, w ← w·(1 − lr·λ) per step: the final weight is the product over the
    steps of the LR and weight decay set for each step's batch (√ rule from reference 16)."""
    model = nn.Linear(4, 1, bias=False)
    nn.init.ones_(model.weight)
    x = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    largebatch.train(
        None,
        [
            f"run.dir={run}",
            "logging.progress=false",
            "optim.name=adamw",
            "optim.lr=0.01",
            "optim.betas=[0.9, 0.99]",
            "optim.weight_decay=0.5",
            "optim.reference_batch=16",
            "optim.scaling=auto",
            "optim.scale_beta2=true",
            "optim.scale_weight_decay=true",
            "batch.global_size=64",
            "batch.micro_size=16",
            "batch.schedule=steps",
            "batch.thresholds=0:16 32:32 96:64",
            "train.steps=3",
            "train.log_every=1",
        ],
        model=model,
        train_data=ArrayDataset(x, x[:, :1]),
        loss=lambda output, targets: ((output * 0).sum(), len(targets)),
    )
    out = capsys.readouterr().out
    assert (
        "batch.schedule=steps: 16 from 0 examples; 32 from 32 examples; 64 from 96 examples" in out
    )
    assert (
        "step 2: global batch 16 → 32" in out
        and "peak lr 0.01 → 0.0141421; β2 0.99 → 0.9801; weight decay 0.5 → 0.707107" in out
    )
    assert "step 4: global batch 32 → 64" in out and "β2 0.9801 → 0.960596" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_batch"] for r in records] == [16, 16, 32, 32, 64, 64]
    expected = 1.0
    for record in records:
        ratio = math.sqrt(record["global_batch"] / 16)
        assert record["lr"] == pytest.approx(0.01 * ratio)
        expected *= 1 - record["lr"] * 0.5 * ratio
    final = torch.load(run / "model.pt", weights_only=True)["weight"]
    assert final == pytest.approx(torch.full((1, 4), expected))
