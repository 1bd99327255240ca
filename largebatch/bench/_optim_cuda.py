"""`largebatch bench optim --device cuda`: the optimizer steps on a GPU, on ResNet-50's and GPT-2 small's shapes.

Our LARS and LAMB (their foreach implementation: the fused kernels are CPU code) against torch's fused SGD and AdamW,
and our Muon against torch.optim.Muon and fused AdamW on GPT-2 small's 48 block matrices (Newton–Schulz in bf16). Each
step is timed between two device synchronisations; the optimizers take turns, one step each per round, as on the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from largebatch.bench.optim import (
    _matrices,
    _param_groups,
    _ratio_line,
    gpt_matrix_shapes,
    resnet50_shapes,
    step_times,
)
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.muon import Muon

GPT2_SMALL = {"width": 768, "blocks": 12, "vocab": 50257, "positions": 1024}


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The 148 parameter shapes of GPT-2 small, (out, in) as nn.Linear stores them, the output head tied to the
    token embedding (124,439,808 values)."""
    width, blocks = GPT2_SMALL["width"], GPT2_SMALL["blocks"]
    shapes: list[tuple[int, ...]] = [
        (GPT2_SMALL["vocab"], width),
        (GPT2_SMALL["positions"], width),
    ]
    for _ in range(blocks):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [
            (width,),
            (width,),
            (4 * width, width),
            (4 * width,),
            (width, 4 * width),
            (width,),
        ]
    return shapes + [(width,), (width,)]


def synchronized_clock(device: torch.device) -> Callable[[], float]:
    """perf_counter after the device's queued work has finished (a CPU needs no wait)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


CANDIDATES: dict[str, Callable[[list[dict]], Optimizer]] = {
    "torch SGD(fused)": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, fused=True),
    "torch SGD(foreach)": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, foreach=True),
    "torch AdamW(fused)": lambda g: torch.optim.AdamW(g, lr=1e-3, fused=True),
    "torch AdamW(foreach)": lambda g: torch.optim.AdamW(g, lr=1e-3, foreach=True),
    "LARS": lambda g: LARS(g, lr=0.1),
    "LAMB": lambda g: LAMB(g, lr=1e-3),
}
"""Name → the optimizer over the parameter groups; ours with impl=auto (foreach off the CPU)."""
MUON_CANDIDATES: dict[str, Callable[[list[torch.nn.Parameter]], Optimizer]] = {
    "Muon (ours, bf16 NS)": lambda p: Muon(p, lr=0.02, weight_decay=0.1),
    "torch.optim.Muon": lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.1),
    "torch AdamW(fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True),
}


def table(times: dict[str, list[float]], base: str) -> None:
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'optimizer':<24}{'ms/step':>9}{f'/{base}':>22}")
    for name, t in ms.items():
        print(f"{name:<24}{t:>9.3f}{t / ms[base]:>22.2f}")


def rows(device: torch.device, steps: int, warmup: int) -> None:
    """Print the step times on `device`: LARS and LAMB on each model's shapes, Muon on GPT-2 small's matrices."""
    clock = synchronized_clock(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"{name}; median of {steps} steps after {warmup}, each between two synchronisations")
    for model, shapes in (("ResNet-50", resnet50_shapes()), ("GPT-2 small", gpt2_small_shapes())):
        values = sum(torch.Size(s).numel() for s in shapes)
        print(f"\n{model}: {len(shapes)} tensors, {values:,} values")
        optimizers = {
            label: make(_param_groups(0, shapes, device)) for label, make in CANDIDATES.items()
        }
        times = step_times(optimizers, steps, warmup, clock=clock)
        del optimizers
        table(times, "torch AdamW(fused)")
        print(_ratio_line(times, "LAMB", "torch AdamW(fused)"))
        print(_ratio_line(times, "LARS", "torch SGD(fused)"))
    matrices = gpt_matrix_shapes(GPT2_SMALL["width"], GPT2_SMALL["blocks"])
    print(f"\nGPT-2 small's {len(matrices)} block matrices (Muon's share of the model)")
    candidates = dict(MUON_CANDIDATES)
    if not hasattr(torch.optim, "Muon"):
        print("torch.optim.Muon: not available (torch < 2.9)")
        del candidates["torch.optim.Muon"]
    optimizers = {
        label: make(_matrices(matrices, lambda t: t.to(device)))
        for label, make in candidates.items()
    }
    times = step_times(optimizers, steps, warmup, clock=clock)
    table(times, "torch AdamW(fused)")
    for other in candidates:
        if other != "Muon (ours, bf16 NS)":
            print(_ratio_line(times, "Muon (ours, bf16 NS)", other))
