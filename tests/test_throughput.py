"""tokens/s and MFU: the FLOP counts against a hand count, the peak table, and a short run of the GPT recipe."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import largebatch
from largebatch import flops
from largebatch.dist import DistInfo
from largebatch.models import checkpointing
from largebatch.models.gpt import GPT, Block
from largebatch.optim.scaling import describe_peak_lr
from largebatch.task import CrossEntropy

ROOT = Path(__file__).resolve().parent.parent
VOCAB, CONTEXT, WIDTH, DEPTH, HEADS = 65, 32, 64, 2, 4


def cross_entropy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    """What Task.score computes with the default loss."""
    return CrossEntropy()(model(inputs), targets)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, CONTEXT, WIDTH, DEPTH, HEADS)


def test_the_gpt_formula_equals_a_hand_count_for_a_tiny_built_in_gpt():
    d, layers = WIDTH, DEPTH
    per_block = 3 * d * d + d * d + 8 * d * d  # qkv, proj, the 4x MLP: matmul weights
    per_block += 3 * d + d + 4 * d + d + 2 * 2 * d  # their biases, two LayerNorms
    n = (
        layers * per_block + 2 * d + VOCAB * d
    )  # final LayerNorm; the head tied to the token table, once
    attention = 2 * 2 * layers * d * CONTEXT  # q·kᵀ and attention·v, 2 FLOPs per multiply-add
    by_hand = 3 * (2 * n + attention)  # forward + backward (2x forward)

    model = tiny_gpt()
    assert flops.matmul_params(model) == n
    assert flops.transformer_shape(model) == (DEPTH, HEADS, WIDTH // HEADS)
    checkpointing.apply(model, (Block,), 1)
    assert flops.transformer_shape(model) == (DEPTH, HEADS, WIDTH // HEADS)
    ours = flops.transformer_flops_per_token(n, DEPTH, HEADS, WIDTH // HEADS, CONTEXT)
    assert abs(ours - by_hand) / by_hand < 0.05 and ours == by_hand


def test_the_flop_counter_agrees_with_the_formula_within_5_percent():
    model, batch = tiny_gpt(), 4
    tokens = torch.randint(
        0, VOCAB, (batch, CONTEXT + 1), generator=torch.Generator().manual_seed(0)
    )
    counted = flops.counted_flops(model, cross_entropy, tokens[:, :-1], tokens[:, 1:])
    formula = flops.transformer_flops_per_token(
        flops.matmul_params(model), DEPTH, HEADS, WIDTH // HEADS, CONTEXT
    )
    assert abs(counted / (batch * CONTEXT) - formula) / formula < 0.05


def test_counting_flops_leaves_no_trace_on_the_model_its_buffers_or_the_rng():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    rng = torch.get_rng_state()
    counted = flops.counted_flops(model, cross_entropy, x, y)
    assert (
        counted == 3 * 2 * 5 * (8 * 16 + 16 * 3) - 2 * 5 * 8 * 16
    )  # no input gradient for layer 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_hugging_face_gpt2_is_counted_by_the_formula_with_its_tied_head_once(tmp_path):
    from conftest import write_tiny_gpt2
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(
        GPT2Config.from_pretrained(write_tiny_gpt2(tmp_path, vocab=VOCAB))
    )
    assert flops.transformer_shape(model) == (1, 2, 16)
    everything = sum(p.numel() for p in model.parameters())
    assert flops.matmul_params(model) == everything - model.transformer.wpe.weight.numel()


@pytest.mark.parametrize(
    "name, precision, tflops",
    [
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA H100 PCIe", "bf16", 756.5),
        ("NVIDIA H100 80GB HBM3", "fp32", 67.0),
        ("NVIDIA H200", "bf16", 989.5),
        ("NVIDIA L4", "fp16", 121.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA A10G", "bf16", math.nan),
    ],
)
def test_a_gpu_peak_comes_from_the_table_by_its_name(monkeypatch, name, precision, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    peak, source = flops.device_peak(torch.device("cuda", 0), precision)
    if math.isnan(tflops):
        assert math.isnan(peak) and "no peak FLOP/s known for NVIDIA A10G" in source
    else:
        assert peak == tflops * 1e12 and "table" in source


def test_the_cpu_peak_is_measured_by_a_matmul_in_under_a_second():
    began = time.perf_counter()
    peak, source = flops.device_peak(torch.device("cpu"), "fp32")
    assert time.perf_counter() - began < 1.0
    assert peak > 1e8 and "measured by a" in source and "fp32 matmul at 1 thread(s)" in source


def test_classification_reports_mfu_from_the_counter_and_no_tokens_per_s(tmp_path):
    from largebatch import config, task

    cfg = config.load(None, ["data.size=64", "model.width=16", f"run.dir={tmp_path}"])
    info = DistInfo(0, 0, 1, torch.device("cpu"))
    built = task.build(cfg)
    throughput = flops.measure(built.build_model(), built, 8, "fp32", info)
    assert not throughput.token_task and throughput.flops_per_token is None
    assert throughput.flops_per_example > 0 and "flop_counter" in throughput.described
    rates = throughput.rates(examples=100, tokens=100, seconds=2.0)
    assert set(rates) == {"mfu"}
    assert rates["mfu"] == pytest.approx(throughput.flops_per_example * 50 / throughput.peak)


def test_the_start_line_says_when_scaling_changed_the_given_lr():
    assert describe_peak_lr(1e-3, 64, 256, "linear") == (
        "optim.lr 0.001 at reference 256 → 0.00025 at global 64 (optim.scaling=linear)"
    )
    assert describe_peak_lr(1e-3, 64, 64, "sqrt") == "peak lr 0.001"
    assert describe_peak_lr(1e-3, 512, 64, "none") == "peak lr 0.001"


@pytest.mark.parametrize("data", ["text", "tokens"])
def test_the_gpt_recipe_reports_tokens_per_s_and_mfu_in_progress_metrics_and_summary(
    tmp_path, capsys, data
):
    from conftest import write_tokens

    run, own_data = tmp_path / "run", []
    if data == "tokens":  # a nanoGPT-style folder: the recipe needs only these two overrides
        folder = tmp_path / "shakespeare_char"
        folder.mkdir()
        for name, count in (("train.bin", 20_000), ("val.bin", 2_000)):
            write_tokens(folder / name, count, vocab=65)
        own_data = ["data.name=tokens", f"data.path={folder}"]
    summary = largebatch.train(
        str(ROOT / "configs" / "gpt-char.yaml"),
        [
            *own_data,
            f"run.dir={run}",
            "model.width=32",
            "model.depth=1",
            "train.steps=4",
            "train.log_every=2",
            "train.eval_every=0",
            "schedule.warmup_steps=1",
            "logging.progress=true",
        ],
    )
    out = capsys.readouterr().out
    assert "peak lr 0.001;" in out and "MFU from 6·N + 12·L·H·Q·T" in out
    progress = [line for line in out.splitlines() if line.startswith(("50%", "100%"))]
    assert len(progress) == 2 and all(" tokens/s | MFU " in line for line in progress)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    on_disk = json.loads((run / "summary.json").read_text())
    for r in [*records, summary, on_disk]:
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * 64)  # every target counts
        assert 0 < r["mfu"] < 1
