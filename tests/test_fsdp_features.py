"""Features beyond the DDP engine's baseline on engine.name=fsdp (2 processes, gloo): fp16 with a sharded loss scaler.

Every training compared runs in one torchrun job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, metrics, relative, train_in_one_job

LM = (
    f"--config={ROOT / 'configs/lamb-lm.yaml'}",
    "model.width=32",
    "data.context=32",
    "batch.global_size=32",
    "batch.micro_size=8",
    "train.steps=20",
    "schedule.warmup_steps=3",
    "train.clip_grad_norm=0.3",
    "train.log_every=1",
    "train.eval_every=0",
    "optim.name=adamw",
    "optim.lr=0.002",
    "train.precision=fp16",
)
"""A byte-level GPT (two blocks sharded as units) at accumulation 2: the initial loss scale 65536 overflows in the
first steps on both ranks, then it trains."""
SPIKE = (
    f"--config={ROOT / 'tests/tasks/linreg.yaml'}",
    "data.name=spike:data",
    "data.args={sigma: 1.0, size: 5120, index: 7, value: 300.0}",
    "train.steps=20",
    "train.noise_scale=false",
    "optim.lr=0.05",
    "train.precision=fp16",
)
"""Linear regression whose one outlier example (trained once in the 20 steps, by one rank) overflows its fp16
gradient: only that rank's local gradient is infinite."""
FSDP = ("engine.name=fsdp",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fsdp_features")
    resume = f"run.resume={base / 'fsdp-lm/checkpoints/step_00000010'}"
    runs = {
        "ddp-lm": LM,
        "fsdp-lm": (*LM, *FSDP, "train.checkpoint_every=10"),
        "fsdp-lm-resumed": (*LM, *FSDP, resume),
    }
    for micro in (128, 64):
        runs[f"ddp-spike-{micro}"] = (*SPIKE, f"batch.micro_size={micro}")
        runs[f"fsdp-spike-{micro}"] = (*SPIKE, f"batch.micro_size={micro}", *FSDP)
    train_in_one_job(base, runs)
    return base


def test_fp16_takes_the_ddp_engines_steps_and_loss_scales(trained: Path) -> None:
    """FSDP all-gathers fp16 parameters (MixedPrecisionPolicy), DDP casts under autocast: per-step losses within
    1e-4 (relative), the same loss scale at every step, the same steps skipped for overflow."""
    ours, reference = metrics(trained / "fsdp-lm"), metrics(trained / "ddp-lm")
    assert len(ours) == 20
    assert relative(ours, reference, "loss") < 1e-4
    assert [m["loss_scale"] for m in ours] == [m["loss_scale"] for m in reference]
    assert [m["applied_steps"] for m in ours] == [m["applied_steps"] for m in reference]
    assert ours[-1]["loss_scale"] < 65536 and ours[-1]["applied_steps"] >= 10
    assert ours[-1]["loss"] < ours[0]["loss"]


@pytest.mark.parametrize("micro", [128, 64])
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(trained: Path, micro: int) -> None:
    """At accumulation 1 and 2: one step skipped (loss scale halved) as on DDP, and the same losses after it."""
    ours, reference = (metrics(trained / f"{e}-spike-{micro}") for e in ("fsdp", "ddp"))
    scales = [m["loss_scale"] for m in ours]
    assert scales == [m["loss_scale"] for m in reference]
    assert scales[0] == 65536 and scales[-1] == 32768
    assert ours[-1]["applied_steps"] == 19 and ours[-1]["nonfinite_steps"] == 0
    assert relative(ours, reference, "loss") < 1e-4


def test_fp16_resume_restores_the_loss_scale(trained: Path) -> None:
    """From step 10 of 20: the loss scale goes on from the checkpoint's (no new overflows from 65536), and the
    parameters end bit-identical to the uninterrupted run."""
    resumed, full = metrics(trained / "fsdp-lm-resumed"), metrics(trained / "fsdp-lm")
    assert [m["step"] for m in resumed] == list(range(11, 21))
    assert [m["loss_scale"] for m in resumed] == [m["loss_scale"] for m in full[10:]]
    summaries = [
        json.loads((trained / f"{r}/summary.json").read_text())
        for r in ("fsdp-lm-resumed", "fsdp-lm")
    ]
    assert summaries[0]["params_sha256"] == summaries[1]["params_sha256"]
