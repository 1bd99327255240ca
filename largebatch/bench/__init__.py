"""`largebatch bench NAME [options]`: benchmarks that print ratios against a baseline, not timed tests."""

from __future__ import annotations

import importlib

from largebatch.errors import check_choice

BENCHMARKS = {
    "data": "our image-folder loader against torchvision's ImageFolder + DataLoader, and whether training is input-bound",
    "loop": "our trainer's samples/s against a minimal hand-written DDP loop",
    "memory": "activation memory and step time with and without gradient checkpointing (tiny GPT, CNN)",
    "optim": "our LARS/LAMB against torch's fused SGD/AdamW and torch-optimizer, on ResNet-50's shapes",
}


def run(name: str, argv: list[str]) -> int:
    check_choice("bench", name, list(BENCHMARKS))
    return importlib.import_module(f"largebatch.bench.{name}").main(argv)
