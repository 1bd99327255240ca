"""`largebatch bench optim` on a few tiny shapes: every ratio with its quartiles, the first-pass floor rows, and
`--cpu-time` refused unless it times one thread."""

from __future__ import annotations

import re

import pytest
import torch

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
