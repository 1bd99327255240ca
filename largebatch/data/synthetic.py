"""Seeded synthetic classification: Gaussian inputs labelled by a random teacher network."""

from __future__ import annotations

import math

import torch

from largebatch.data import ArrayDataset, Data


def build(
    size: int, eval_size: int, shape: list[int], classes: int, label_noise: float, seed: int
) -> Data:
    """Labels are the argmax of a random two-layer tanh teacher; `label_noise` of them are resampled."""
    gen = torch.Generator().manual_seed(seed)
    features = math.prod(shape)
    hidden = 4 * classes
    w1 = torch.randn(features, hidden, generator=gen) / math.sqrt(features)
    w2 = torch.randn(hidden, classes, generator=gen) / math.sqrt(hidden)

    def split(n: int) -> ArrayDataset:
        x = torch.randn(n, *shape, generator=gen)
        y = (torch.tanh(x.reshape(n, -1) @ w1) @ w2).argmax(dim=1)
        noisy = torch.rand(n, generator=gen) < label_noise
        y = torch.where(noisy, torch.randint(classes, (n,), generator=gen), y)
        return ArrayDataset(x, y)

    return Data(split(size), split(eval_size), tuple(shape), classes, fingerprint="synthetic")
