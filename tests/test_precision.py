"""Mixed precision, gradient checkpointing and norm choice (issue: memory and precision)."""

from __future__ import annotations

import pytest
import torch
from conftest import cli_in_process, metrics, train

from largebatch import models
from largebatch.config import ModelConfig
from largebatch.data import Data

QUICK = ("--config", "configs/quickstart.yaml")


@pytest.fixture(scope="module")
def fp32_curve(tmp_path_factory):
    run = tmp_path_factory.mktemp("fp32")
    train(run, "train.epochs=10", "train.precision=fp32", config=QUICK[1])
    return [r["loss"] for r in metrics(run)]


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.02)])
def test_mixed_precision_tracks_the_fp32_loss_curve(run_dirs, fp32_curve, precision, tolerance):
    """Stated tolerance: every logged loss within `tolerance` absolute of fp32 on the quickstart task (10 epochs)."""
    run = run_dirs(precision)
    summary = train(run, "train.epochs=10", f"train.precision={precision}", config=QUICK[1])
    curve = [r["loss"] for r in metrics(run)]
    assert len(curve) == len(fp32_curve)
    assert max(abs(a - b) for a, b in zip(curve, fp32_curve)) <= tolerance
    assert summary["nonfinite_steps"] == 0


def test_fp16_overflow_belongs_to_the_loss_scale_is_not_nonfinite_and_does_not_advance_the_schedule(
    run_dirs,
):
    """A loss scale of 1e12 overflows the first gradients: the GradScaler skips those updates and lowers the scale.
    That is routine, so nothing counts as non-finite (train.nonfinite=stop keeps going), and the LR warmup
    waits for the applied steps."""
    run = run_dirs("fp16_overflow")
    summary = train(
        run,
        "data.size=512",
        "model.width=32",
        "train.steps=40",
        "train.log_every=1",
        "train.precision=fp16",
        "train.fp16_init_scale=1e12",
        "schedule.warmup_steps=10",
        "train.nonfinite=stop",
    )
    records = metrics(run)
    assert summary["nonfinite_steps"] == 0
    assert 0 < summary["applied_steps"] < 40
    assert records[-1]["loss_scale"] < 1e12
    applied_before = [0] + [r["applied_steps"] for r in records[:-1]]
    for record, applied in zip(records, applied_before):
        assert record["lr"] == pytest.approx(summary["peak_lr"] * min(1.0, (applied + 1) / 10))
    assert all(torch.isfinite(t).all() for t in torch.load(run / "model.pt").values())
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize(
    "name, shape, inputs",
    [
        ("resnet", (3, 8, 8), lambda: torch.randn(6, 3, 8, 8)),
        ("gpt", (16,), lambda: torch.randint(0, 256, (6, 16))),
    ],
)
@pytest.mark.parametrize("every", [True, 2])
def test_checkpointed_and_plain_models_give_equal_gradients(name, shape, inputs, every):
    cfg = ModelConfig(name=name, norm="group", width=16, depth=2, heads=2)
    torch.manual_seed(0)
    data = Data(None, None, input_shape=shape, num_classes=256 if name == "gpt" else 10)
    plain = models.build(cfg, data)
    torch.manual_seed(0)
    checkpointed = models.build(ModelConfig(**{**vars(cfg), "grad_checkpointing": every}), data)
    assert any(type(m).__name__ == "Checkpointed" for m in checkpointed.modules())
    x = inputs()
    for model in (plain, checkpointed):
        model.train()
        model(x).float().square().mean().backward()
    grads_plain = [p.grad for p in plain.parameters()]
    grads_ckpt = [p.grad for p in checkpointed.parameters()]
    assert len(grads_plain) == len(grads_ckpt)
    for a, b in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(a, b)


def test_checkpointing_under_ddp_with_accumulation_and_bf16_matches_without(run_dirs):
    common = (
        "data.name=text",
        "model.name=gpt",
        "model.width=32",
        "model.depth=2",
        "model.heads=2",
        "data.context=16",
        "batch.global_size=16",
        "batch.micro_size=4",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "optim.scaling=none",
        "train.steps=6",
        "train.log_every=1",
        "train.precision=bf16",
    )
    a, b = run_dirs("plain"), run_dirs("ckpt")
    train(a, *common, nproc=2)
    train(b, *common, "model.grad_checkpointing=true", nproc=2)
    for x, y in zip(metrics(a), metrics(b)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_syncbatchnorm_on_cpu_is_a_one_line_error():
    result = cli_in_process(
        "train", "data.name=digits", "model.name=resnet", "model.norm=syncbatch"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "largebatch: error: model.norm=syncbatch needs CUDA (SyncBatchNorm runs on NCCL); "
        "use batch or group on CPU"
    )


def test_grad_checkpointing_on_a_model_without_blocks_is_a_one_line_error():
    result = cli_in_process("train", "model.grad_checkpointing=true")
    assert result.returncode == 2 and "found no blocks to recompute in mlp" in result.stderr
