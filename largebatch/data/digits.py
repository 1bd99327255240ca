"""The UCI 8×8 handwritten digits (1797 images, 10 classes), shipped with the package."""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

from largebatch.data import ArrayDataset, Data, split_indices


def build(eval_fraction: float, seed: int) -> Data:
    """Pixels scaled to [0, 1] as 1×8×8 images; a seeded split holds out `eval_fraction`."""
    with resources.files("largebatch.data").joinpath("digits.csv.gz").open("rb") as raw:
        table = np.loadtxt(gzip.open(raw), delimiter=",", dtype=np.float32)
    x = torch.from_numpy(table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    kept, held = split_indices(len(y), eval_fraction, seed)
    return Data(
        ArrayDataset(x[kept], y[kept]),
        ArrayDataset(x[held], y[held]),
        (1, 8, 8),
        10,
        fingerprint="digits",
    )
