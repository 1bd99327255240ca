"""engine.name=deepspeed on CPU (gloo, 2 processes): ZeRO 0-3 against the DDP engine, checkpoints, refusals.

The trainings that are compared run in one torchrun job, one after another in the same two processes (each
builds its own engine): 25 trainings cost one interpreter start and one DeepSpeed import instead of 25.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    assert_resumed,
    cli_in_process,
    metrics,
    relative,
    train,
    train_in_one_job,
    write_tiny_gpt2,
    write_tokens,
)

LM = (
    f"--config={ROOT / 'configs/lamb-lm.yaml'}",
    "optim.name=adamw",
    "optim.lr=0.002",
    "model.width=32",
    "data.context=32",
    "batch.global_size=32",
    "train.steps=20",
    "schedule.warmup_steps=3",
    "train.clip_grad_norm=0.3",
    "train.log_every=1",
    "train.eval_every=0",
    "logging.progress=false",
)
"""A byte-level GPT: its loss has one term per token, so the count normalisation is not 1, and clipping is on."""
DS = ("engine.name=deepspeed",)
RESUMED_FROM = "ds2-a2/checkpoints/step_00000010"
"""Stage 2's checkpoint at step 10 of 20, resumed on 2 processes and on 1."""
RESUMED = (*LM, *DS, "engine.zero_stage=2", "batch.micro_size=8")


def runs(tiny_gpt2: Path, tokens: Path) -> dict[str, tuple[str, ...]]:
    hf = (
        "data.name=tokens",
        f"data.path={tokens}",
        "data.context=32",
        f"model.name=hf:{tiny_gpt2}",
        "optim.name=adamw",
        "optim.lr=3e-3",
        "batch.global_size=16",
        "batch.micro_size=4",
        "train.steps=8",
        "train.log_every=1",
        "logging.progress=false",
    )
    user = (
        f"--config={ROOT / 'examples/mytask.yaml'}",
        "train.epochs=null",
        "train.steps=8",
        "train.log_every=1",
        "logging.progress=false",
        "batch.micro_size=64",
        "schedule.warmup_steps=2",
    )
    diverge = (
        "data.size=512",
        "model.width=32",
        "optim.lr=1e20",
        "optim.scaling=none",
        "train.steps=20",
        "train.log_every=1",
        "logging.progress=false",
    )
    lars = (
        f"--config={ROOT / 'configs/quickstart.yaml'}",
        "optim.name=lars",
        "train.epochs=null",
        "train.steps=10",
        "schedule.warmup_epochs=null",
        "schedule.warmup_steps=2",
        "batch.micro_size=128",
        "train.log_every=1",
        "train.eval_every=0",
        "logging.progress=false",
    )
    table = {
        "ddp-a1": (*LM, "batch.micro_size=16"),
        "ddp-a2": (*LM, "batch.micro_size=8", "train.noise_scale=true"),
        "ddp-lamb": (*LM, "batch.micro_size=8", "optim.name=lamb"),
        "ddp-hf": hf,
        "ddp-user": user,
        "ds0-lamb": (*LM, *DS, "batch.micro_size=8", "optim.name=lamb"),
        "ds1-bf16": (*LM, *DS, "engine.zero_stage=1", "batch.micro_size=8", "train.precision=bf16"),
        "ds3-hf": (*hf, *DS, "engine.zero_stage=3"),
        "ds2-user": (*user, *DS, "engine.zero_stage=2"),
        "ddp-diverge": diverge,
        "ds3-diverge": (*diverge, *DS, "engine.zero_stage=3"),
        "ddp-lars": lars,
        "ds0-lars": (*lars, *DS),
    }
    for stage in range(4):
        table[f"ds{stage}-a1"] = (*LM, *DS, f"engine.zero_stage={stage}", "batch.micro_size=16")
        noise = ("train.noise_scale=true",) if stage < 2 else ()
        table[f"ds{stage}-a2"] = (
            *LM,
            *DS,
            f"engine.zero_stage={stage}",
            "batch.micro_size=8",
            *noise,
            *(("train.checkpoint_every=10",) if stage == 2 else ()),
        )
    return table


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Every comparison's training, in one 2-process job; returns the directory of their run directories."""
    base = tmp_path_factory.mktemp("ds")
    table = runs(write_tiny_gpt2(base / "tiny-gpt2"), write_tokens(base / "train.bin", 20_000))
    # after ds2-a2 in the same job: its step-10 checkpoint, resumed on the same 2 processes
    table["ds2-a2-resumed"] = (*RESUMED, f"run.resume={base / RESUMED_FROM}")
    train_in_one_job(base, table)
    return base


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("accum", [1, 2])
def test_every_zero_stage_takes_the_ddp_engines_steps(
    trained: Path, stage: int, accum: int
) -> None:
    """fp32, AdamW, clipping on, a per-token loss: per-step loss and pre-clip grad_norm within 1e-4 (relative)."""
    ours, reference = metrics(trained / f"ds{stage}-a{accum}"), metrics(trained / f"ddp-a{accum}")
    assert len(ours) == 20
    assert relative(ours, reference, "loss") < 1e-4
    assert relative(ours, reference, "grad_norm") < 1e-4
    assert max(m["grad_norm"] for m in ours) > 0.3  # the clip (0.3) acted
    assert (
        json.loads((trained / f"ds{stage}-a{accum}/deepspeed.json").read_text())[
            "gradient_accumulation_steps"
        ]
        == accum
    )


@pytest.mark.parametrize("stage", [0, 1])
def test_noise_scale_at_stages_0_and_1_is_the_ddp_engines(trained: Path, stage: int) -> None:
    ours, reference = metrics(trained / f"ds{stage}-a2"), metrics(trained / "ddp-a2")
    measured = [(a["gns"], b["gns"]) for a, b in zip(ours, reference) if "gns" in b]
    assert measured and all(a == pytest.approx(b, rel=1e-4) for a, b in measured)


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_layerwise_optimizers_at_stage_0_are_the_ddp_engines(trained: Path, name: str) -> None:
    ours, reference = metrics(trained / f"ds0-{name}"), metrics(trained / f"ddp-{name}")
    assert (
        relative(ours, reference, "loss") < 1e-4 and relative(ours, reference, "grad_norm") < 1e-4
    )
    assert any(key.startswith("trust_ratio/") for key in ours[-1])


def test_bf16_trains(trained: Path) -> None:
    losses = [m["loss"] for m in metrics(trained / "ds1-bf16")]
    assert (
        losses[-1] < losses[0]
        and relative(metrics(trained / "ds1-bf16"), metrics(trained / "ddp-a2"), "loss") < 0.02
    )
    assert (
        json.loads((trained / "ds1-bf16/deepspeed.json").read_text())["torch_autocast"]["dtype"]
        == "bfloat16"
    )


def test_nonfinite_steps_are_skipped_and_counted_as_under_ddp(trained: Path) -> None:
    """optim.lr=1e20: DeepSpeed's overflow check skips the step; the schedule does not advance on it."""
    ours, reference = (
        json.loads((trained / name / "summary.json").read_text())
        for name in ("ds3-diverge", "ddp-diverge")
    )
    assert ours["nonfinite_steps"] == reference["nonfinite_steps"] > 0
    assert ours["applied_steps"] == reference["applied_steps"]
    assert all(
        torch.isfinite(t).all() for t in torch.load(trained / "ds3-diverge/model.pt").values()
    )


@pytest.mark.parametrize("ours, reference", [("ds3-hf", "ddp-hf"), ("ds2-user", "ddp-user")])
def test_user_tasks_run_unchanged(trained: Path, ours: str, reference: str) -> None:
    """An hf: model on a token file at stage 3, and a user module (examples/mytask.py) at stage 2."""
    assert relative(metrics(trained / ours), metrics(trained / reference), "loss") < 1e-4
    summary, reference_summary = (
        json.loads((trained / name / "summary.json").read_text()) for name in (ours, reference)
    )
    assert summary["eval"]["loss"] == pytest.approx(reference_summary["eval"]["loss"], rel=1e-4)


@pytest.mark.parametrize("nproc", [2, 1])
def test_resume_continues_exactly_also_on_another_world_size(
    trained: Path, tmp_path: Path, nproc: int
) -> None:
    """From stage 2's checkpoint at step 10 of 20: on 2 processes, and on 1 through DeepSpeed's universal checkpoint."""
    full = trained / "ds2-a2"
    checkpoint = trained / RESUMED_FROM
    assert {p.name for p in (checkpoint / "deepspeed").iterdir()} >= {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert (
        "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"
        in json.loads((checkpoint / "manifest.json").read_text())["files"]
    )
    if nproc == 2:  # trained in the fixture's job, right after ds2-a2
        resumed_dir = trained / "ds2-a2-resumed"
    else:
        resumed_dir = tmp_path
        train(
            tmp_path,
            *RESUMED[1:],
            f"run.resume={checkpoint}",
            config=LM[0].split("=", 1)[1],
            nproc=nproc,
        )
    assert_resumed(full, resumed_dir, at=10, end=20, rtol=1e-6, exact=nproc == 2)
    assert not list(checkpoint.parent.glob(".universal_*"))


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ("engine.ds_config={train_batch_size: 64}",),
            "engine.ds_config sets train_batch_size=64 but batch.global_size gives 32",
        ),
        (
            ("engine.ds_config={gradient_clipping: 1.0}",),
            "gradient_clipping=1.0 but train.clip_grad_norm gives 0.3",
        ),
        (
            ("engine.ds_config={zero_optimization: {stage: 3}}",),
            "zero_optimization.stage=3 but engine.zero_stage gives 2",
        ),
        (
            ("engine.ds_config={optimizer: {type: Adam}}",),
            "engine.ds_config sets optimizer, which optim.name owns",
        ),
        (
            ("engine.ds_config={zero_optimization: {offload_optimizer: {device: cpu}}}",),
            "engine.ds_config sets zero_optimization.offload_optimizer, which engine.offload owns",
        ),
        (("engine.ds_config=missing.json",), "engine.ds_config=missing.json not found"),
        (
            ("optim.name=lamb",),
            "optim.name=lamb computes a trust ratio per layer, but engine.zero_stage=2 flattens",
        ),
        (
            ("optim.name=lambc", "engine.zero_stage=1"),
            "optim.name=lambc computes a trust ratio per layer",
        ),
        (
            ("train.noise_scale=true",),
            "train.noise_scale needs each rank's gradient before the reduction",
        ),
        (
            ("batch.micro_size=auto",),
            "batch.micro_size=auto is not supported with engine.name=deepspeed",
        ),
        (
            ("engine.offload=cpu", "engine.zero_stage=0"),
            "engine.offload=cpu moves the sharded optimizer state",
        ),
        (("train.precision=fp16",), "train.precision=fp16 with engine.name=deepspeed needs CUDA"),
        (("engine.zero_stage=4",), "engine.zero_stage=4 must be 0, 1, 2 or 3"),
        (("engine.name=ddp",), "engine.zero_stage is ignored with engine.name=ddp"),
    ],
)
def test_impossible_deepspeed_settings_are_one_line_before_any_process_group(
    overrides, says
) -> None:
    result = cli_in_process(
        "plan", LM[0], *LM[1:], *DS, "engine.zero_stage=2", *overrides, "--world-size", "2"
    )
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_checkpoint_of_another_zero_stage_is_refused_in_one_line(
    trained: Path, tmp_path: Path
) -> None:
    result = cli_in_process(
        "train",
        LM[0],
        *LM[1:],
        *DS,
        "batch.micro_size=8",
        f"run.resume={trained / 'ds2-a2/checkpoints/step_00000010'}",
        f"run.dir={tmp_path}",
    )
    assert (
        result.returncode == 2
        and "was trained with engine.zero_stage=2, this config has 0" in result.stderr
    )


def test_under_the_deepspeed_launcher(tmp_path: Path) -> None:
    """launch/deepspeed.sh runs the DeepSpeed engine (2 local processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [
            "launch/deepspeed.sh",
            LM[0].split("=", 1)[1],
            *LM[1:],
            *DS,
            "engine.zero_stage=2",
            "batch.micro_size=16",
            "train.steps=4",
            f"run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NPROC": "2", "MASTER_PORT": str(port)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(metrics(tmp_path)) == 4 and (tmp_path / "deepspeed.json").is_file()
