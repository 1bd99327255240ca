"""Dataset registry: every task returns train/eval tensors, generated or read locally (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from largebatch.config import DataConfig
from largebatch.errors import check_choice


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory (inputs, labels); `__getitems__` lets the DataLoader gather a micro-batch in one indexing op."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.inputs[index], self.labels[index]


def task_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every loss term: one per example for classification, one per token for text."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction=reduction)


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate for `__getitems__` batches, which arrive already stacked."""
    return batch


@dataclass
class Task:
    """Train/eval data; labels are classes per example, or per token for language modelling."""

    train: ArrayDataset
    eval: ArrayDataset
    input_shape: tuple[int, ...]
    num_classes: int
    items_per_example: int = 1
    """Loss terms per example (tokens per window for text); the loss is averaged over all of them."""


def build(cfg: DataConfig) -> Task:
    from largebatch.data import digits, synthetic, text

    builders: dict[str, Callable[[DataConfig], Task]] = {
        "synthetic": synthetic.build, "digits": digits.build, "text": text.build,
    }
    return builders[check_choice("data.name", cfg.name, list(builders))](cfg)
