"""The start of a run: inputs a model can .view(), a start check on two examples and a backward that leaves no
trace on the one model built, and compiled-kernel builds announced and kept out of every samples/s figure."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_in_process, metrics, write_jsonl, write_tokens
from torch import nn

from largebatch import builds, config, job, task
from largebatch.optim import fused

TINY = ("data.size=256", "data.eval_size=64", "batch.global_size=32", "logging.progress=false")
MLP = ("model.name=mlp", "model.width=16", "model.depth=1")

VIEWING = '''
import torch
import torch.nn.functional as F
from torch import nn


class Viewing(nn.Module):
    """A language model that .view()s its inputs: it needs them contiguous, as many models do."""

    def __init__(self, vocab_size=256, width=16):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab_size, width), nn.Linear(width, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        rows, length = input_ids.shape
        return self.head(self.embed(input_ids.view(-1))).view(rows, length, -1)


def build(vocab_size=256):
    return Viewing(vocab_size)


def loss(logits, targets):
    """Counted cross-entropy that .view()s the targets, as nanoGPT's model does."""
    flat = targets.view(-1)
    total = F.cross_entropy(logits.view(flat.numel(), -1), flat, ignore_index=-100, reduction="sum")
    return total, (flat != -100).sum()
'''


def _user_config(folder: Path, module: str, source: str, body: str) -> Path:
    """A config beside a user module `module` (imported from the config's folder)."""
    (folder / f"{module}.py").write_text(source)
    path = folder / "config.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("name", ["synthetic", "digits", "text", "tokens", "jsonl", "imagefolder"])
def test_every_builtin_dataset_yields_contiguous_tensors(tmp_path, name):
    paths = {
        "tokens": lambda: [
            f"data.path={write_tokens(tmp_path / 'c.bin', 4000)}",
            "data.context=16",
        ],
        "jsonl": lambda: [f"data.path={write_jsonl(tmp_path / 'lines.jsonl', 40)}"],
        "imagefolder": lambda: [f"data.path={_images(tmp_path)}", "data.image_size=8"],
    }
    overrides = paths[name]() if name in paths else []
    data = task.build_data(config.load(None, [f"data.name={name}", *overrides]))
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=4, shuffle=True, collate_fn=task.collate_of(data.train)
    )
    for batch in (task.take(data.train, [0, 1, 2]), next(iter(loader))):
        tensors = list(_tensors(batch))
        assert tensors and all(t.is_contiguous() for t in tensors), [t.stride() for t in tensors]
    key = (0, 0, 1) if getattr(data.train, "epoch_aware", False) else 1
    assert all(
        t.is_contiguous() for t in _tensors(data.train[key])
    )  # jsonl's items are token lists


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)


def _images(folder: Path) -> Path:
    """Two classes of three 12×10 RGB images (PIL's layout is channels-last)."""
    pytest.importorskip("torchvision")
    from PIL import Image

    root = folder / "images"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(10, 12, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("name", ["tokens", "jsonl"])
def test_a_model_that_views_its_inputs_and_targets_trains(tmp_path, name):
    data = (
        f"{{name: tokens, path: {write_tokens(tmp_path / 'corpus.bin', 4000)}, context: 16}}"
        if name == "tokens"
        else f"{{name: jsonl, path: {write_jsonl(tmp_path / 'lines.jsonl', 60)}, context: 16}}"
    )
    module = f"viewing_{name}"
    path = _user_config(
        tmp_path,
        module,
        VIEWING,
        f"data: {data}\nmodel: {{name: '{module}:build'}}\n"
        f"train: {{loss: '{module}:loss', steps: 3, log_every: 1}}\nbatch: {{global_size: 8}}\n",
    )
    result = cli_in_process(
        "train", "--config", str(path), f"run.dir={tmp_path / 'run'}", "logging.progress=false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(metrics(tmp_path / "run")) == 3


def test_a_model_that_fails_only_on_a_batch_of_two_is_one_line_at_start(tmp_path):
    source = (
        "from torch import nn\n\n\n"
        "class OneAtATime(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(32, 10)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.view(1, -1))  # assumes one example: fine for a batch of one\n\n\n"
        "def build():\n"
        "    return OneAtATime()\n"
    )
    path = _user_config(tmp_path, "one_at_a_time", source, "model: {name: 'one_at_a_time:build'}\n")
    result = cli_in_process("train", "--config", str(path), f"run.dir={tmp_path / 'run'}", *TINY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("largebatch: error: model.name=one_at_a_time:build does not fit")
    assert "a batch of 2 training examples" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class Stateful(nn.Module):
    """BatchNorm statistics, dropout draws and an existing gradient: everything a check could leave behind."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm, self.drop = nn.Linear(32, 10), nn.BatchNorm1d(10), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(self.fc(x)))


def test_the_start_check_runs_a_backward_and_leaves_no_trace_on_the_model():
    cfg = config.load(None, list(TINY))
    model = Stateful().eval()
    model.fc.bias.grad = torch.ones(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seen = []
    model.fc.weight.register_hook(lambda grad: seen.append(grad.shape))
    task.check(task.build(cfg, model=model), model, "python:Stateful")
    assert seen == [model.fc.weight.shape]  # the backward ran
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, batches tracked
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.fc.weight.grad is None and torch.equal(model.fc.bias.grad, torch.ones(10))
    assert not any(m.training for m in model.modules())


def test_prepare_trains_the_model_it_checked_with_the_rng_a_fresh_build_leaves():
    cfg = config.load(None, [*TINY, *MLP, "model.norm=batch", "run.seed=3"])
    prepared = job.prepare(cfg, 1)
    torch.manual_seed(3)
    fresh = prepared.task.build_model()
    assert torch.equal(torch.get_rng_state(), prepared.rng_after_build)
    ours, theirs = prepared.model.state_dict(), fresh.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert all(p.grad is None for p in prepared.model.parameters())


def test_the_model_is_built_once_per_process(tmp_path):
    source = (
        "from torch import nn\n\n\n"
        "def build():\n"
        "    print('building the model')\n"
        "    return nn.Linear(32, 10)\n"
    )
    path = _user_config(tmp_path, "loud", source, "model: {name: 'loud:build'}\n")
    run = tmp_path / "run"
    result = cli_in_process(
        "train", "--config", str(path), f"run.dir={run}", *TINY, "train.steps=2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("building the model") == 1


BUILD_S = 5
"""The stand-in kernel build's seconds: far above a step of the tiny MLP (milliseconds) even on a loaded machine."""


def test_a_kernel_build_is_announced_and_never_timed(tmp_path, monkeypatch):
    """The fused kernel's build replaced by a BUILD_S one: the build lines are printed, and no samples/s figure
    (progress lines, metrics.jsonl, summary.json) holds those seconds."""
    from torch.utils import cpp_extension

    kernels = (
        fused.load()
    )  # the real kernels, built here if the cache is cold: the build below is only the sleep

    def slow_load(**kwargs):
        time.sleep(BUILD_S)
        return kernels

    monkeypatch.setattr(cpp_extension, "load", slow_load)
    monkeypatch.setattr(builds, "is_built", lambda name, sources: False)
    fused._build.cache_clear()
    fused._load_or_warn.cache_clear()
    run = tmp_path / "run"
    began = time.perf_counter()
    try:
        result = cli_in_process(
            "train",
            f"run.dir={run}",
            *TINY,
            *MLP,
            "optim.name=lamb",
            "optim.impl=auto",
            "train.steps=4",
            "train.log_every=1",
            "logging.progress=true",
        )
    finally:
        fused._build.cache_clear()
        fused._load_or_warn.cache_clear()
    elapsed = time.perf_counter() - began
    assert result.returncode == 0, result.stderr[-3000:]
    assert "building the fused LAMB/LARS kernel (once; cached in" in result.stdout
    built = re.search(r"built the fused LAMB/LARS kernel in ([\d.]+) s", result.stdout)
    assert built and float(built.group(1)) >= BUILD_S
    summary = json.loads((run / "summary.json").read_text())
    assert summary["wall_s"] <= elapsed - BUILD_S  # the timed window starts after the build
    # With the build inside any figure, it would be at most its examples ÷ BUILD_S: 32 per step, 128 in the summary.
    progress = [float(x) for x in re.findall(r"\| ([\d.]+) samples/s", result.stdout)]
    assert len(progress) == 4 and min(progress) > 2 * 32 / BUILD_S
    assert min(m["samples_per_s"] for m in metrics(run)) > 2 * 32 / BUILD_S
    assert summary["samples_per_s"] > 2 * 128 / BUILD_S


def test_the_api_trains_the_module_instance_it_is_given(tmp_path):
    import largebatch
    from largebatch.data import ArrayDataset
    from largebatch.trainer import params_sha256

    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    given = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    summary = largebatch.train(
        None,
        [
            f"run.dir={tmp_path / 'run'}",
            "logging.progress=false",
            "train.steps=2",
            "batch.global_size=32",
        ],
        model=given,
        train_data=ArrayDataset(x, (x[:, 0] > 0).long()),
    )
    assert params_sha256(given.state_dict()) == summary["params_sha256"]


def test_process_age_counts_from_when_the_operating_system_started_the_process():
    import psutil

    from largebatch.dist import process_age_s

    before = process_age_s()
    time.sleep(0.1)
    assert 0.1 <= process_age_s() - before < 0.5
    # psutil's start time counts from the boot time in whole seconds (/proc/stat's btime)
    assert before == pytest.approx(time.time() - psutil.Process().create_time(), abs=1.1)
