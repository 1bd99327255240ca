"""Seeded synthetic classification: Gaussian inputs labelled by a random teacher network."""

from __future__ import annotations

import math

import torch

from largebatch.config import DataConfig
from largebatch.data import ArrayDataset, Task


def build(cfg: DataConfig) -> Task:
    """Labels are the argmax of a random two-layer tanh teacher; `label_noise` of them are resampled."""
    gen = torch.Generator().manual_seed(cfg.seed)
    features = math.prod(cfg.shape)
    hidden = 4 * cfg.classes
    w1 = torch.randn(features, hidden, generator=gen) / math.sqrt(features)
    w2 = torch.randn(hidden, cfg.classes, generator=gen) / math.sqrt(hidden)

    def split(n: int) -> ArrayDataset:
        x = torch.randn(n, *cfg.shape, generator=gen)
        y = (torch.tanh(x.reshape(n, -1) @ w1) @ w2).argmax(dim=1)
        noisy = torch.rand(n, generator=gen) < cfg.label_noise
        y = torch.where(noisy, torch.randint(cfg.classes, (n,), generator=gen), y)
        return ArrayDataset(x, y)

    return Task(split(cfg.size), split(cfg.eval_size), tuple(cfg.shape), cfg.classes)
