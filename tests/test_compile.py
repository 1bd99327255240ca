"""`train.compile`: torch.compile composes with DDP, FSDP2, gradient checkpointing and checkpoints, and trains what
the eager model trains. The backend is aot_eager (dynamo's graph capture and AOT autograd, torch's kernels), which
exercises the composition without inductor's C++ build; what inductor buys is measured in docs/benchmarks.md."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import cli_in_process, metrics, relative, train_in_one_job

GPT = (
    "model.name=gpt",
    "data.name=text",
    "data.context=16",
    "model.width=32",
    "model.depth=2",
    "model.heads=2",
    "model.grad_checkpointing=true",
    "batch.global_size=8",
    "train.steps=3",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "logging.progress=false",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("compile")
    train_in_one_job(
        base,
        {
            "eager": GPT,
            "ddp": (*GPT, "train.compile=aot_eager"),
            "fsdp": (*GPT, "train.compile=aot_eager", "engine.name=fsdp"),
        },
    )
    return base


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_compiled_model_trains_as_the_eager_one_with_checkpointed_blocks(runs, engine):
    compiled = yaml.safe_load((runs / engine / "config.yaml").read_text())["derived"]["compiled"]
    assert compiled == {"ddp": {"DistributedDataParallel": 1}, "fsdp": {"Checkpointed": 2}}[engine]
    assert relative(metrics(runs / engine), metrics(runs / "eager"), "loss") < 1e-5


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_checkpoints_and_the_saved_model_of_a_compiled_model_keep_the_eager_keys(runs, engine):
    eager = torch.load(runs / "eager" / "model.pt", weights_only=True)
    assert list(torch.load(runs / engine / "model.pt", weights_only=True)) == list(eager)
    written = [path for path in (runs / engine / "checkpoints").rglob("*") if path.is_file()]
    assert written and not any(b"_orig_mod" in path.read_bytes() for path in written)


def test_unknown_backend_is_one_line_with_the_known_ones():
    result = cli_in_process("plan", "train.compile=inductr")
    assert result.returncode == 2
    assert "train.compile=inductr is not a torch.compile backend" in result.stderr
    assert "aot_eager" in result.stderr and len(result.stderr.strip().splitlines()) == 1
