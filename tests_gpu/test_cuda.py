"""The GPU check list (`make test-gpu`, not part of `make test`): the CUDA paths the CPU suite cannot reach.

NCCL DDP, DeepSpeed ZeRO-2/3 in fp32, bf16 and fp16 (and CPU offload with DeepSpeed's CPU Adam), FSDP2 in fp32
(AdamW and sharded LAMB) and bf16, SyncBatchNorm,
LARS/LAMB on CUDA against the same optimizer on the CPU, a real CUDA out-of-memory error caught by
`batch.micro_size=auto`, and find-batch on the real allocator. Runs on 2 GPUs where there are 2 or more, else on 1.
Without CUDA every test skips with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU check list needs one"
)
ROOT = Path(__file__).resolve().parents[1]
WORLD = min(2, torch.cuda.device_count())
RESNET = [
    f"--config={ROOT / 'configs/quickstart.yaml'}",
    "train.epochs=null",
    "train.steps=30",
    "schedule.warmup_epochs=null",
    "schedule.warmup_steps=5",
    "train.log_every=1",
    "logging.progress=false",
]
GPT = [
    f"--config={ROOT / 'configs/lamb-lm.yaml'}",
    "optim.name=adamw",
    "optim.lr=0.002",
    "batch.global_size=64",
    "batch.micro_size=16",
    "train.steps=30",
    "schedule.warmup_steps=5",
    "train.clip_grad_norm=0.5",
    "train.log_every=1",
    "train.eval_every=0",
    "logging.progress=false",
]


def train(
    run: Path, args: list[str], *overrides: str, nproc: int = WORLD
) -> tuple[dict, list[dict]]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "largebatch",
        "train",
        *args,
        f"run.dir={run}",
        *overrides,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    said = [line for line in done.stderr.splitlines() if line.startswith("largebatch:")]
    assert done.returncode == 0, "\n".join(said) + done.stderr[-2000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "summary.json").read_text()), [m for m in metrics if "loss" in m]


def learned(metrics: list[dict]) -> None:
    losses = [m["loss"] for m in metrics]
    assert all(map(lambda x: x == x and abs(x) != float("inf"), losses)), losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_ddp_over_nccl(tmp_path: Path, precision: str) -> None:
    summary, metrics = train(tmp_path, RESNET, f"train.precision={precision}")
    learned(metrics)
    assert summary["world_size"] == WORLD
    assert ("loss_scale" in metrics[-1]) == (precision == "fp16")


@pytest.fixture(scope="module")
def ddp_gpt(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return train(tmp_path_factory.mktemp("ddp"), GPT)[1]


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_zero(tmp_path: Path, stage: int, precision: str, ddp_gpt: list[dict]) -> None:
    _, metrics = train(
        tmp_path,
        GPT,
        "engine.name=deepspeed",
        f"engine.zero_stage={stage}",
        f"train.precision={precision}",
    )
    learned(metrics)
    if precision == "fp32":  # CUDA kernels are not bit-reproducible across wrappers: a loose bound
        for ours, ref in zip(metrics, ddp_gpt):
            assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-3)
            assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2)
    assert (run_config := json.loads((tmp_path / "deepspeed.json").read_text()))[
        "zero_optimization"
    ]["stage"] == stage
    assert run_config["train_batch_size"] == 64


def test_deepspeed_cpu_offload(tmp_path: Path) -> None:
    _, metrics = train(
        tmp_path, GPT, "engine.name=deepspeed", "engine.zero_stage=2", "engine.offload=cpu"
    )
    learned(metrics)


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp(tmp_path: Path, optimizer: str, precision: str) -> None:
    """FSDP2 over NCCL; fp32 within CUDA's reproducibility of the DDP engine, trust ratios included for LAMB."""
    lamb = ("optim.name=lamb", "optim.lr=0.004") if optimizer == "lamb" else ()
    _, metrics = train(tmp_path, GPT, "engine.name=fsdp", f"train.precision={precision}", *lamb)
    learned(metrics)
    if precision == "fp32":
        _, reference = train(tmp_path / "ddp", GPT, *lamb)
        for ours, ref in zip(metrics, reference):
            assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-3)
            ratios = [k for k in ref if k.startswith("trust_ratio/")]
            assert [ours[k] for k in ratios] == pytest.approx([ref[k] for k in ratios], rel=1e-3)
    assert json.loads((tmp_path / "fsdp.json").read_text())["units"][-1] == "(root)"


def test_syncbatchnorm(tmp_path: Path) -> None:
    _, metrics = train(tmp_path, RESNET, "model.norm=syncbatch")
    learned(metrics)


@pytest.mark.parametrize("name", ["lars", "lamb"])
@pytest.mark.parametrize("impl", ["foreach", "auto"])
def test_layerwise_optimizers_match_the_cpu(name: str, impl: str) -> None:
    from largebatch.optim.lamb import LAMB
    from largebatch.optim.lars import LARS

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32, 3, 3), (300, 300), (17, 5), (128,)]
    weights = [0.1 * torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(10)]

    def run(device: str, impl: str) -> list[torch.Tensor]:
        params = [w.clone().to(device) for w in weights]
        groups = [
            {"params": params[:3], "weight_decay": 1e-4},
            {"params": params[3:], "weight_decay": 0.0, "adapt": False},
        ]
        opt = (
            LARS(groups, lr=0.1, momentum=0.9, impl=impl)
            if name == "lars"
            else LAMB(groups, lr=0.01, impl=impl)
        )
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.to(device)
            opt.step()
        return [p.cpu() for p in params]

    for cuda, cpu in zip(run("cuda", impl), run("cpu", "foreach")):
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-6)


def test_real_cuda_oom_is_caught_by_auto_micro(tmp_path: Path) -> None:
    """A 1 GiB cap on the allocator: the whole per-rank share of a wide GPT does not fit, a smaller micro-batch does."""
    summary, metrics = train(
        tmp_path,
        GPT,
        "batch.micro_size=auto",
        "batch.memory_limit=1GiB",
        "model.width=512",
        "data.context=256",
        "train.steps=5",
        "schedule.warmup_steps=1",
        nproc=1,
    )
    assert summary["micro_batch"] < 64 and summary["micro_batch"] * summary["accum_steps"] == 64
    assert len(metrics) == 5


def test_find_batch_on_the_real_allocator(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "largebatch",
            "find-batch",
            *GPT[:1],
            "--memory-limit",
            "4GiB",
            "--repeats",
            "1",
            "model.width=256",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MiB" in done.stdout or "GiB" in done.stdout, done.stdout
