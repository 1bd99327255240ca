"""A complete user task: your own Dataset, model and loss, trained by largebatch from YAML or from Python.

    largebatch train --config examples/mytask.yaml                    # the YAML route (factories by name)
    python examples/train_mytask.py                                   # the Python route (objects)
    torchrun --nproc-per-node 2 examples/train_mytask.py              # either one, on 2 processes

The task: sequences of random length (4 to 24 steps) of 2-D points; predict, at every step, which quadrant the
running mean of the points is in. Sequences are padded per micro-batch, and padded steps carry the target -100,
so the loss counts only real steps — the case where a per-micro-batch mean gives the wrong gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class RunningQuadrant(torch.utils.data.Dataset):
    """`size` generated sequences; item i is the same on every rank and every run with the same seed."""

    def __init__(self, size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 25, (size,), generator=gen)
        self.points = [torch.randn(int(n), 2, generator=gen) for n in lengths]

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.points[index]
        mean = x.cumsum(0) / torch.arange(1, len(x) + 1).unsqueeze(1)
        return x, (mean[:, 0] > 0).long() + 2 * (mean[:, 1] > 0).long()

    @staticmethod
    def collate(
        batch: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Pad to the longest sequence of the micro-batch; the model gets the points and a mask of real steps."""
        points = nn.utils.rnn.pad_sequence([x for x, _ in batch], batch_first=True)
        targets = nn.utils.rnn.pad_sequence(
            [y for _, y in batch], batch_first=True, padding_value=IGNORE
        )
        return {"points": points, "mask": targets != IGNORE}, targets


def build_data(size: int = 4096, seed: int = 0) -> tuple[RunningQuadrant, RunningQuadrant]:
    return RunningQuadrant(size, seed), RunningQuadrant(size // 4, seed + 1)


class QuadrantRNN(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(
            self.rnn(points)[0]
        )  # causal: padding after a step cannot change its output


def build_model(hidden: int = 64) -> QuadrantRNN:
    return QuadrantRNN(hidden)


def loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-step cross-entropies, number of real steps): largebatch divides once, by the global count."""
    total = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    return total, (targets != IGNORE).sum()
