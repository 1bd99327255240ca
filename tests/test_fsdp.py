"""engine.name=fsdp on CPU (gloo, 2 processes): torch FSDP2 against the DDP engine, sharded LARS/LAMB, DCP checkpoints.

The trainings that are compared run in one torchrun job, one after another in the same two processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
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
    "model.width=32",
    "data.context=32",
    "batch.global_size=32",
    "train.steps=20",
    "schedule.warmup_steps=3",
    "train.clip_grad_norm=0.3",
    "train.log_every=1",
    "train.eval_every=0",
    "logging.progress=false",
    "optim.weight_decay=0.01",
)
"""A byte-level GPT (two blocks, tied embeddings): a per-token loss, so the count normalisation is not 1; clipping
on."""
OPTIMIZERS = {
    "sgd": ("optim.name=sgd", "optim.lr=0.5", "optim.betas=[0.9, 0.999]", "optim.eps=1e-8"),
    "adamw": ("optim.name=adamw", "optim.lr=0.002"),
    "lars": ("optim.name=lars", "optim.lr=5.0", "optim.betas=[0.9, 0.999]", "optim.eps=1e-8"),
    "lamb": ("optim.name=lamb", "optim.lr=0.004"),
}
FSDP = ("engine.name=fsdp",)
CHECKPOINT = "{base}/fsdp-lamb-a2/checkpoints/step_00000010"


RESUMED = (*LM, *OPTIMIZERS["lamb"], *FSDP, "batch.micro_size=8")
"""fsdp-lamb-a2 again, to resume from its checkpoint at step 10."""


def runs(tiny_gpt2: Path, tokens: Path, resume_from: str) -> dict[str, tuple[str, ...]]:
    """Every training of the 2-process job, in order: the resume after the run it resumes."""
    hf = (
        "data.name=tokens",
        f"data.path={tokens}",
        "data.context=32",
        f"model.name=hf:{tiny_gpt2}",
        "optim.name=lamb",
        "optim.lr=3e-3",
        "batch.global_size=16",
        "batch.micro_size=4",
        "train.steps=8",
        "train.log_every=1",
        "logging.progress=false",
    )
    resnet = (
        f"--config={ROOT / 'configs/quickstart.yaml'}",
        "optim.name=lars",
        "train.epochs=null",
        "train.steps=6",
        "schedule.warmup_epochs=null",
        "schedule.warmup_steps=2",
        "batch.micro_size=64",
        "train.log_every=1",
        "train.eval_every=3",
        "logging.progress=false",
    )
    table: dict[str, tuple[str, ...]] = {
        "ddp-hf": hf,
        "fsdp-hf": (*hf, *FSDP),
        "ddp-resnet": resnet,
        "fsdp-resnet": (*resnet, *FSDP),
    }
    for name, optimizer in OPTIMIZERS.items():
        for accum in (1, 2):
            plan = (*LM, *optimizer, f"batch.micro_size={16 // accum}")
            table[f"ddp-{name}-a{accum}"] = plan
            table[f"fsdp-{name}-a{accum}"] = (
                *plan,
                *FSDP,
                *(("train.checkpoint_every=10",) if name == "lamb" else ()),
            )
    table["fsdp-lamb-a2-resumed"] = (*RESUMED, f"run.resume={resume_from}")
    table["fsdp-bf16"] = (
        *LM,
        *OPTIMIZERS["adamw"],
        "batch.micro_size=8",
        *FSDP,
        "train.precision=bf16",
    )
    return table


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Every comparison's training, in one 2-process job; returns the directory of their run directories."""
    base = tmp_path_factory.mktemp("fsdp")
    train_in_one_job(
        base,
        runs(
            write_tiny_gpt2(base / "tiny-gpt2"),
            write_tokens(base / "train.bin", 20_000),
            CHECKPOINT.format(base=base),
        ),
    )
    return base


def shard_units(run_dir: Path) -> tuple[list[str], dict[str, int]]:
    """fsdp.json's units by name, after checking that it and config.yaml (derived, beside the user's empty
    engine.shard_blocks) name the same classes; returns (units, classes with their counts)."""
    written = json.loads((run_dir / "fsdp.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["engine"]["shard_blocks"] == []
    assert config["derived"]["shard_blocks"] == written["shard_blocks"]
    return written["units"], written["shard_blocks"]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp_takes_the_ddp_engines_steps(trained: Path, name: str, accum: int) -> None:
    """fp32, clipping on, per-token loss, 20 steps: per-step loss and pre-clip grad_norm within 1e-4 (relative)."""
    ours, reference = (
        metrics(trained / f"fsdp-{name}-a{accum}"),
        metrics(trained / f"ddp-{name}-a{accum}"),
    )
    assert len(ours) == 20
    assert relative(ours, reference, "loss") < 1e-4
    assert relative(ours, reference, "grad_norm") < 1e-4
    assert max(m["grad_norm"] for m in ours) > 0.3  # the clip (0.3) acted
    assert shard_units(trained / f"fsdp-{name}-a{accum}") == (
        ["blocks.0", "blocks.1", "(root)"],
        {"Block": 2},
    )


@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("accum", [1, 2])
def test_sharded_trust_ratios_are_the_whole_layers(trained: Path, name: str, accum: int) -> None:
    """Every logged trust ratio of every layer under FSDP equals DDP's (unsharded) one within 1e-5."""
    ours, reference = (
        metrics(trained / f"fsdp-{name}-a{accum}"),
        metrics(trained / f"ddp-{name}-a{accum}"),
    )
    keys = [k for k in reference[0] if k.startswith("trust_ratio/")]
    assert len(keys) >= 8
    for a, b in zip(ours, reference):
        assert [k for k in a if k.startswith("trust_ratio/")] == keys
        assert torch.allclose(
            torch.tensor([a[k] for k in keys]), torch.tensor([b[k] for k in keys]), rtol=1e-5
        )


@pytest.mark.parametrize("model", ["hf", "resnet"])
def test_user_and_vision_models_shard_by_their_blocks(trained: Path, model: str) -> None:
    """An hf: GPT-2 (its _no_split_modules: GPT2Block) with LAMB; the quickstart ResNet (BatchNorm buffers, eval) with
    LARS: the same losses, eval metrics and units as expected."""
    assert (
        relative(metrics(trained / f"fsdp-{model}"), metrics(trained / f"ddp-{model}"), "loss")
        < 1e-4
    )
    ours, reference = (
        json.loads((trained / f"{e}-{model}/summary.json").read_text()) for e in ("fsdp", "ddp")
    )
    assert ours["eval"]["loss"] == pytest.approx(reference["eval"]["loss"], rel=1e-4)
    assert shard_units(trained / f"fsdp-{model}") == (
        (["transformer.h.0", "(root)"], {"GPT2Block": 1})
        if model == "hf"
        else (["3", "4", "(root)"], {"BasicBlock": 2})
    )


def test_bf16_trains(trained: Path) -> None:
    """bf16 through FSDP's MixedPrecisionPolicy: trains, within 2% of the fp32 DDP run's losses."""
    losses = [m["loss"] for m in metrics(trained / "fsdp-bf16")]
    assert losses[-1] < losses[0]
    assert (
        relative(metrics(trained / "fsdp-bf16"), metrics(trained / "ddp-adamw-a2"), "loss") < 0.02
    )


def test_model_pt_is_the_whole_model(trained: Path) -> None:
    ours, reference = (torch.load(trained / f"{e}-adamw-a2/model.pt") for e in ("fsdp", "ddp"))
    assert list(ours) == list(reference)
    assert all(torch.allclose(ours[k], reference[k], atol=1e-6) for k in ours)


@pytest.mark.parametrize("nproc", [2, 1])
def test_resume_continues_exactly_also_on_another_world_size(
    trained: Path, tmp_path: Path, nproc: int
) -> None:
    """LAMB, accumulation 2, from the checkpoint at step 10 of 20: on 2 processes (resumed in the job, after the run)
    bit-identical to the uninterrupted run; on 1 (torch.distributed.checkpoint reshards) the same losses within
    1e-5."""
    full = trained / "fsdp-lamb-a2"
    checkpoint = Path(CHECKPOINT.format(base=trained))
    assert {"fsdp/.metadata", "fsdp/__0_0.distcp", "fsdp/__1_0.distcp"} <= set(
        json.loads((checkpoint / "manifest.json").read_text())["files"]
    )
    if nproc == 2:
        run = trained / "fsdp-lamb-a2-resumed"
    else:
        run = tmp_path
        train(run, *RESUMED[1:], f"run.resume={checkpoint}", config=RESUMED[0].split("=", 1)[1])
    assert_resumed(full, run, at=10, end=20, rtol=1e-5, exact=nproc == 2)


@pytest.mark.parametrize(
    "overrides, says",
    [
        (
            ("engine.shard_blocks=[Nope]",),
            "engine.shard_blocks names Nope, which the model does not have; its module "
            "classes with children: Block, Sequential",
        ),
        (
            ("engine.name=ddp", "engine.shard_blocks=[Block]"),
            "engine.shard_blocks is ignored with engine.name=ddp",
        ),
    ],
)
def test_impossible_fsdp_settings_are_one_line_before_any_process_group(overrides, says) -> None:
    result = cli_in_process(
        "plan", LM[0], *LM[1:], *FSDP, "batch.micro_size=8", *overrides, "--world-size", "2"
    )
    assert result.returncode == 2
    assert says in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
