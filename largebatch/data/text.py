"""Byte-level language modelling on Python's own reference text (the pydoc topics of CPython 3.11, shipped).

Each example is a window of `data.context` bytes and the same window shifted by one as targets;
training windows come from the first (1 - eval_fraction) of the corpus, held-out ones from the rest.
"""

from __future__ import annotations

import gzip
from importlib import resources

import torch

from largebatch.data import ArrayDataset, Data

VOCAB = 256


def build(eval_fraction: float, context: int) -> Data:
    with resources.files("largebatch.data").joinpath("pydoc_topics.txt.gz").open("rb") as raw:
        corpus = torch.frombuffer(bytearray(gzip.decompress(raw.read())), dtype=torch.uint8).long()
    cut = round(len(corpus) * (1 - eval_fraction))
    return Data(
        _windows(corpus[:cut], context),
        _windows(corpus[cut:], context),
        (context,),
        VOCAB,
        fingerprint="text",
        vocab_size=VOCAB,
        context=context,
    )


def _windows(tokens: torch.Tensor, context: int) -> ArrayDataset:
    """Non-overlapping windows: inputs tokens[i:i+T], targets tokens[i+1:i+T+1]."""
    n = (len(tokens) - 1) // context
    inputs = tokens[: n * context].view(n, context)
    targets = tokens[1 : n * context + 1].view(n, context)
    return ArrayDataset(inputs, targets)
