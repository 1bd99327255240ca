"""Linear regression with a known gradient noise scale: the noise scale's ground truth (tests/test_noise.py).

x ~ N(0, I_d), y = x·w* + ε with ε ~ N(0, σ²), loss ½(x·w − y)². At a fixed w, with δ = w − w*, the mean gradient
is δ and the per-example gradient's covariance has trace (d + 1)·|δ|² + d·σ², so the simple noise scale is
B_simple = d·(1 + σ²/|δ|²) + 1 (McCandlish et al. 2018, App. A). The model starts at w* + δ with |δ| = `delta`.
"""

from __future__ import annotations

import os

import torch
from torch import nn

DIM = 16


def w_star() -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(1))


class Regression(torch.utils.data.Dataset):
    def __init__(self, size: int, sigma: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, DIM, generator=gen)
        self.y = self.x @ w_star() + sigma * torch.randn(size, generator=gen)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def data(sigma: float, size: int = 32768) -> tuple[Regression, Regression]:
    return Regression(size, sigma, 0), Regression(256, sigma, 2)


class Recorded(Regression):
    """Appends each training index it serves to `<record>/<rank>.txt` (tests/test_batch_schedule.py: which examples
    each step trained on)."""

    def __init__(self, size: int, sigma: float, seed: int, record: str) -> None:
        super().__init__(size, sigma, seed)
        self.record = record

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with open(os.path.join(self.record, f"{os.environ.get('RANK', '0')}.txt"), "a") as f:
            f.write(f"{index}\n")
        return super().__getitem__(index)


def recorded_data(sigma: float, size: int, record: str) -> tuple[Regression, Regression]:
    os.makedirs(record, exist_ok=True)
    return Recorded(size, sigma, 0, record), Regression(256, sigma, 2)


def model(delta: float) -> nn.Module:
    linear = nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w_star() + delta * torch.ones(DIM) / DIM**0.5)
    return linear


def hidden_model(hidden: int) -> nn.Module:
    """A linear model with a hidden weight matrix (what Muon orthogonalises; the last Linear is the output head)."""
    return nn.Sequential(nn.Linear(DIM, hidden, bias=False), nn.Linear(hidden, 1, bias=False))


def loss(output: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    residual = output.squeeze(-1) - targets
    return 0.5 * (residual * residual).sum(), residual.numel()


def simple_noise_scale(sigma: float, delta: float) -> float:
    return DIM * (1 + sigma**2 / delta**2) + 1


def dropout_model(delta: float, p: float) -> nn.Module:
    """`model` behind a dropout of its inputs: training draws from torch's CPU generator (tests/test_noise.py)."""
    return nn.Sequential(nn.Dropout(p), model(delta))
