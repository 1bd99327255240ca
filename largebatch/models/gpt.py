"""A small GPT (Radford et al. 2019, as in nanoGPT): pre-norm causal self-attention blocks, tied embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.errors import UserError


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


CHECKPOINT_BLOCKS = (Block,)
"""What model.grad_checkpointing wraps."""


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.token.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln(self.blocks(self.token(tokens) + self.position(positions))))


def build(
    input_shape: tuple[int, ...], num_classes: int, width: int, depth: int, heads: int
) -> nn.Module:
    if len(input_shape) != 1:
        raise UserError(
            f"model.name=gpt needs token sequences, but the data gives shape {list(input_shape)}; use data.name=text"
        )
    if width % heads:
        raise UserError(f"model.width={width} is not divisible by model.heads={heads}")
    return GPT(num_classes, input_shape[0], width, depth, heads)
