"""`largebatch bench optim` on a few tiny shapes: every ratio with its quartiles, the first-pass floor rows, and
`--cpu-time` refused unless it times one thread."""

from __future__ import annotations

import re

import pytest
import torch

from largebatch.bench import _optim_cuda as optim_cuda
from largebatch.bench import optim as bench_optim
from largebatch.errors import UserError


def test_ratios_come_with_quartiles_and_the_first_pass_floors(monkeypatch, capsys) -> None:
    monkeypatch.setattr(
        bench_optim, "resnet50_shapes", lambda: [(64, 32, 3, 3), (64,), (10, 64), (10,)]
    )
    threads = torch.get_num_threads()
    try:
        assert bench_optim.main(["--cpu-time", "--threads=1", "--steps=4", "--warmup=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines() if len(line) > 24}
    for name in (
        "LAMB(fused) first pass",
        "LARS(fused) first pass",
        "LAMB(fused)",
        "torch AdamW(fused)",
    ):
        assert float(rows[name][0]) > 0
    for ratio, goal in [
        ("LAMB(fused)/torch AdamW(fused)", "goal ≤ 1.15"),
        ("LARS(fused)/torch SGD(fused)", "goal ≤ 1.2"),
        ("LAMB(fused) first pass/torch AdamW(fused)", "the floor's lower bound"),
        ("LARS(fused) first pass/torch SGD(fused)", "the floor's lower bound"),
    ]:
        found = re.search(
            re.escape(ratio) + r" = ([\d.]+) \(quartiles ([\d.]+)-([\d.]+)\) \((.*)\)", out
        )
        assert found, ratio
        median, q1, q3 = (float(x) for x in found.groups()[:3])
        assert q1 <= median <= q3 and found.group(4) == goal


@pytest.mark.parametrize(
    "argv", [["--cpu-time", "--threads=2"], ["--cpu-time", "--threads=1", "--sharded"]]
)
def test_cpu_time_needs_one_thread_and_no_collective(argv: list[str]) -> None:
    with pytest.raises(UserError, match="--cpu-time times one thread"):
        bench_optim.main(argv)


def test_gpt2_small_shapes_are_gpt2_smalls_124m_parameters() -> None:
    shapes = optim_cuda.gpt2_small_shapes()
    assert len(shapes) == 148 and sum(torch.Size(s).numel() for s in shapes) == 124_439_808


def test_the_gpu_rows_time_lars_lamb_on_both_models_and_muon(monkeypatch, capsys) -> None:
    """`--device cuda`'s rows, run on the CPU (the code is the same but for the synchronisation), on tiny shapes."""
    monkeypatch.setattr(optim_cuda, "resnet50_shapes", lambda: [(64, 32, 3, 3), (64,), (10, 64)])
    monkeypatch.setattr(optim_cuda, "gpt2_small_shapes", lambda: [(100, 32), (32,), (96, 32)])
    monkeypatch.setattr(
        optim_cuda, "GPT2_SMALL", {**optim_cuda.GPT2_SMALL, "width": 32, "blocks": 1}
    )
    optim_cuda.rows(torch.device("cpu"), 4, 1)
    out = capsys.readouterr().out
    assert "ResNet-50: 3 tensors" in out and "GPT-2 small: 3 tensors" in out
    assert "GPT-2 small's 4 block matrices" in out
    pairs = [
        ("LAMB", "torch AdamW(fused)"),
        ("LARS", "torch SGD(fused)"),
        ("Muon (ours, bf16 NS)", "torch.optim.Muon"),
        ("Muon (ours, bf16 NS)", "torch AdamW(fused)"),
    ]
    for name, base in pairs:
        found = re.findall(
            re.escape(f"{name}/{base}") + r" = ([\d.]+) \(quartiles ([\d.]+)-([\d.]+)\)", out
        )
        assert len(found) == (1 if name.startswith("Muon") else 2), (name, out)
        for median, q1, q3 in found:
            assert 0 < float(q1) <= float(median) <= float(q3)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--device=cuda", "--muon"], "--device cuda prints its own rows"),
        (["--device=cuda"], "torch sees no CUDA device here"),
    ],
)
def test_device_cuda_needs_a_gpu_and_no_other_mode(argv, says) -> None:
    with pytest.raises(UserError, match=re.escape(says)):
        bench_optim.main(argv)
