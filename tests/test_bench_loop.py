"""`largebatch bench loop`'s baselines stay what the trainer is measured against: their sources and jobs are pinned."""

from __future__ import annotations

import hashlib
import inspect
import json
import re

import pytest
import torch

from largebatch import config, dist, job
from largebatch.bench import loop
from largebatch.errors import UserError

PINNED = {
    "ddp": "95a267a49ed6f062f1c451da6f59b091c8e66607b1b1db1294bcbdc581dfb534",
    "fsdp": "f927270d107522741bf5aaa06e381e34db4a706970f668b7212fbf286d5e1f92",
    "gpt": "f5df75a6c738d8dae0daac514cae9e59c2562206d4221a2dae665701a38563a5",
    "gpt-gpu": "efef11daeed334b92576328079359f319d3297dac0e0d062f162286c0b6f38fa",
}
"""sha256 of each hand-written loop's source. Change one only with a reason in docs/benchmarks.md: a faster trainer is
the goal, a slower baseline is not."""
JOBS = {
    "CONFIG": "836e2cd9e775d5b02113f394880a854179622f08a6bd8f6397574da182d5c05d",
    "GPT_CONFIG": "364a181aa61c883fed12fac3face61aea151e17fd6cec6c413d9f065cc5ade1b",
    "GPT_GPU_CONFIG": "bd00bc128b32ba440b37262aac530aca6b00f4d8ad03ba424112cbbbf54b5baa",
}
"""sha256 of the jobs both sides train (the overrides, one per line)."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_hand_written_loop_source_is_pinned(name: str) -> None:
    assert sha256(inspect.getsource(loop.BASELINES[name])) == PINNED[name]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_benchmark_jobs_are_pinned(name: str) -> None:
    assert sha256("\n".join(getattr(loop, name))) == JOBS[name]


def test_every_compared_loop_has_a_baseline_and_a_goal() -> None:
    assert (
        set(loop.BASELINES)
        == set(loop.GOALS)
        == {"ddp", "fsdp", "gpt", "gpt-gpu", "ddp-clip", "fsdp-clip"}
    )
    for name in loop.BASELINES:
        hand, trainer = [overrides for _, overrides in loop.LOOPS[name].values()]
        assert hand is None and isinstance(trainer, tuple)
        assert (loop.CLIP[0] in trainer) == name.endswith("-clip")


def test_clipping_clips_each_sgd_step_of_a_hand_written_loop_and_only_inside() -> None:
    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.tensor([30.0, 40.0, 0.0])  # norm 50
    opt = torch.optim.SGD([weight], lr=1.0)
    with loop.clipping(1.0):
        opt.step()
    assert weight.detach().tolist() == pytest.approx([-0.6, -0.8, 0.0])
    weight.grad = torch.tensor([30.0, 40.0, 0.0])
    opt.step()  # unpatched again
    assert weight.detach().tolist() == pytest.approx([-30.6, -40.8, 0.0])


def test_spread_reports_median_quartiles_and_range() -> None:
    line = loop.spread([0.97, 0.99, 1.0, 1.01, 1.05])
    assert line == "per repeat: median 1.000, quartiles 0.990–1.010, range 0.970–1.050"


def test_the_gpu_loop_trains_on_the_device_it_is_given_in_its_precision(
    monkeypatch, tmp_path
) -> None:
    """nanoGPT's GPU step is device-agnostic code: on the CPU, in bf16 autocast, it trains the job's GPT."""
    cfg = config.load(
        None, [*loop.GPT_CONFIG, "train.precision=bf16", "train.steps=2", f"run.dir={tmp_path}"]
    )
    the_job = job.prepare(cfg, 1)
    built = []
    build = the_job.task.build_model
    monkeypatch.setattr(the_job.task, "build_model", lambda: built.append(build()) or built[0])
    before = [p.detach().clone() for p in build().parameters()]
    assert loop.handwritten_gpt_gpu(the_job, dist.DistInfo(0, 0, 1, torch.device("cpu"))) > 0
    after = list(built[0].parameters())
    assert all(a.dtype == torch.float32 and a.isfinite().all() for a in after)
    assert all(not torch.equal(b, a.detach()) for b, a in zip(before, after) if a.dim() == 2)


def test_the_gpu_comparison_prints_tokens_per_second_and_mfu_of_both_sides(
    monkeypatch, capsys
) -> None:
    """`bench loop --gpt --device cuda` end to end with its workers run here on the CPU (a stand-in GPU)."""
    monkeypatch.setattr(loop, "GPT_GPU_CONFIG", loop.GPT_CONFIG)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)

    def in_process(module: str, nproc: int, *args: str, cpu_only: bool = False) -> dict:
        assert (module, nproc, cpu_only, args[0]) == ("largebatch.bench.loop", 1, False, "gpt-gpu")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the workers' "GPU"
        loop.worker(args[0], int(args[1]), int(args[2]), args[3:] == ("compile",))
        return json.loads(capsys.readouterr().out.splitlines()[-1])

    monkeypatch.setattr(loop.bench, "run_workers", in_process)
    assert loop.main(["--gpt", "--device", "cuda", "--steps", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("nanoGPT-style loop, GPU", "largebatch trainer, GPU"):
        found = re.search(
            re.escape(label) + r" +(\d+) samples/s, (\d+) tokens/s, MFU ([\d.]+)%", out
        )
        assert found, out
        samples, tokens, mfu = (float(x) for x in found.groups())
        assert tokens == pytest.approx(samples * 64, rel=0.01) and 0 < mfu < 100
    assert (
        "on cpu, GPT 4 × 128, 4 heads, 64 positions, vocabulary 256: MFU from 6·N + 12·L·H·Q·T"
        in out
    )
    assert re.search(r"ratio trainer / nanoGPT-style = [\d.]+ \(goal ≥ 1.0\); per repeat", out)
    found = re.search(
        r"step time: nanoGPT-style ([\d.]+) ms, trainer ([\d.]+) ms \(([+-][\d.]+) ms a step\)", out
    )
    assert found, out
    base_ms, trainer_ms, extra = (float(x) for x in found.groups())
    assert extra == pytest.approx(trainer_ms - base_ms, abs=0.011)
    base_samples = float(re.search(r"nanoGPT-style loop, GPU +(\d+) samples/s", out).group(1))
    assert base_ms == pytest.approx(1e3 * 64 / base_samples, rel=0.01)  # GPT_CONFIG's global batch


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device", "cuda"], "--device cuda is for --gpt"),
        (["--gpt", "--compile"], "--compile is for --gpt --device cuda"),
        (["--gpt", "--device", "cuda"], "torch sees no CUDA device here"),
    ],
)
def test_gpu_options_are_refused_where_they_do_not_apply(argv, says) -> None:
    with pytest.raises(UserError, match=re.escape(says)):
        loop.main(argv)
