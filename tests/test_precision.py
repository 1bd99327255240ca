"""Mixed precision, gradient checkpointing and norm choice (issue: memory and precision)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ROOT, cli_in_process, metrics, train_in_one_job

from largebatch import models
from largebatch.config import ModelConfig
from largebatch.data import Data

QUICK = (
    f"--config={ROOT / 'configs/quickstart.yaml'}",
    "train.epochs=10",
    "logging.progress=false",
)
OVERFLOW = (
    "data.size=512",
    "model.width=32",
    "train.steps=40",
    "train.log_every=1",
    "train.precision=fp16",
    "train.fp16_init_scale=1e12",
    "schedule.warmup_steps=10",
    "train.nonfinite=stop",
    "logging.progress=false",
)


MLP = ("model.name=mlp", "model.norm=batch")
"""fp16 runs on the quickstart's data with a conv-free model: CPU has no fast fp16 convolution backward (300 ms a
call, 90 s for the ResNet's 10 epochs). Not GroupNorm: in an MLP its groups are 2 features wide, and normalising
two numbers gives ±1 by the sign of their difference, which fp16 rounding flips (0.3 apart from fp32 at width 64)."""
REFERENCE = {"bf16": "fp32", "fp16": "fp32-mlp"}
"""Each mixed-precision run's fp32 reference: the same model."""


CHECKPOINTING = (
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
    "logging.progress=false",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """This file's trainings: the ResNet's and the checkpointing pair in one 2-process job (DDP, as the quickstart
    runs), the fp16 ones on one process (so mixed precision is trained both ways)."""
    base = tmp_path_factory.mktemp("precision")
    two = {
        "fp32": (*QUICK, "train.precision=fp32"),
        "bf16": (*QUICK, "train.precision=bf16"),
        "plain": CHECKPOINTING,
        "ckpt": (*CHECKPOINTING, "model.grad_checkpointing=true"),
    }
    one = {
        "fp32-mlp": (*QUICK, *MLP, "train.precision=fp32"),
        "fp16": (*QUICK, *MLP, "train.precision=fp16"),
        "fp16_overflow": OVERFLOW,
    }
    train_in_one_job(base, two)
    stderr = train_in_one_job(base, one, nproc=1)
    (base / "fp16" / "stderr").write_text(stderr["fp16"])
    return base


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.02)])
def test_mixed_precision_tracks_the_fp32_loss_curve(trained, precision, tolerance):
    """Stated tolerance: every logged loss within `tolerance` absolute of fp32 on the quickstart task (10 epochs):
    bf16 on its ResNet, fp16 on an MLP (see MLP)."""
    fp32_curve = [r["loss"] for r in metrics(trained / REFERENCE[precision])]
    curve = [r["loss"] for r in metrics(trained / precision)]
    assert len(curve) == len(fp32_curve)
    assert max(abs(a - b) for a, b in zip(curve, fp32_curve)) <= tolerance
    assert json.loads((trained / precision / "summary.json").read_text())["nonfinite_steps"] == 0


def test_fp16_overflow_belongs_to_the_loss_scale_is_not_nonfinite_and_does_not_advance_the_schedule(
    trained,
):
    """A loss scale of 1e12 overflows the first gradients: the GradScaler skips those updates and lowers the scale.
    That is routine, so nothing counts as non-finite (train.nonfinite=stop keeps going), and the LR warmup
    waits for the applied steps."""
    run = trained / "fp16_overflow"
    summary = json.loads((run / "summary.json").read_text())
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


def test_checkpointing_under_ddp_with_accumulation_and_bf16_matches_without(trained):
    a, b = trained / "plain", trained / "ckpt"
    for x, y in zip(metrics(a), metrics(b)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_fp16_convolutions_on_cpu_are_warned_of_once_and_fp16_linear_layers_are_not(
    trained, tmp_path
):
    run = (f"run.dir={tmp_path}", "train.steps=1", "batch.global_size=16", "logging.progress=false")
    resnet = ("data.name=digits", "model.name=resnet", "model.norm=group", "model.width=8")
    result = cli_in_process("train", *resnet, "train.precision=fp16", *run)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "no fast fp16 convolution" in line]
    assert warned == [
        "largebatch: warning: train.precision=fp16 on CPU: PyTorch has no fast fp16 convolution backward there "
        "(the quickstart's ResNet trains about 9x slower than in fp32); use train.precision=bf16 on CPU"
    ]
    assert "fp16 convolution" not in (trained / "fp16" / "stderr").read_text()  # the fp16 MLP


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


def _grads(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((64, 32), (32,), (10, 64))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params


@pytest.mark.parametrize("clip", [None, 0.5, 1e3])
@pytest.mark.parametrize("scale", [1.0, 1 / 64])
def test_the_counted_loss_factor_rides_clippings_multiply(clip, scale):
    """unscale_and_clip(..., scale): the gradients and norm of multiplying by `scale`, then torch's clip_grad_norm_
    (bit for bit at scale 1), in one pass over the gradients."""
    from largebatch.precision import Precision

    mine, theirs = _grads(0), _grads(0)
    optimizer = torch.optim.SGD(mine, lr=0.1)
    norm = Precision("fp32", torch.device("cpu")).unscale_and_clip(optimizer, mine, clip, scale)
    torch._foreach_mul_([p.grad for p in theirs], scale)
    expected = (
        torch.nn.utils.clip_grad_norm_(theirs, clip, foreach=True)
        if clip is not None
        else torch.nn.utils.get_total_norm([p.grad for p in theirs])
    )
    if scale == 1.0:
        assert torch.equal(norm, expected)
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(mine, theirs))
    else:
        assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    clipped = torch.nn.utils.get_total_norm([p.grad for p in mine]).item()
    assert clipped == pytest.approx(min(clip or math.inf, expected.item()), rel=1e-5)
