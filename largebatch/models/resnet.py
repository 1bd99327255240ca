"""A small ResNet for small images: a 3×3 stem, two stages of basic blocks, global pooling.

The last norm weight in each residual branch starts at zero (Goyal et al. 2017, §5.1), so every
block starts as the identity, which helps large-batch training early on.
"""

from __future__ import annotations

import torch
from torch import nn

from largebatch.errors import UserError
from largebatch.models.norms import norm2d


class BasicBlock(nn.Module):
    def __init__(self, norm: str, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.norm1 = norm2d(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = norm2d(norm, channels)
        if isinstance(self.norm2, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.zeros_(self.norm2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels, 1, stride, bias=False), norm2d(norm, channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


CHECKPOINT_BLOCKS = (BasicBlock,)
"""What model.grad_checkpointing wraps."""


def build(
    input_shape: tuple[int, ...], num_classes: int, width: int, depth: int, norm: str
) -> nn.Module:
    if len(input_shape) != 3:
        raise UserError(
            f"model.name=resnet needs image inputs (channels, height, width), but the data gives shape "
            f"{list(input_shape)}; use data.name=digits or e.g. data.shape=[3, 16, 16]"
        )
    blocks: list[nn.Module] = []
    channels_in = width
    for stage, channels in enumerate((width, 2 * width)):
        for i in range(depth):
            blocks.append(BasicBlock(norm, channels_in, channels, 2 if stage and i == 0 else 1))
            channels_in = channels
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False),
        norm2d(norm, width),
        nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels_in, num_classes),
    )
