"""Linear regression (linreg.py) with one outlier example whose fp16 gradient overflows on the rank that trains it
(tests/test_fsdp_features.py: an overflow on one rank skips the step on every rank)."""

from __future__ import annotations

from linreg import Regression


def data(sigma: float, size: int, index: int, value: float) -> tuple[Regression, Regression]:
    """`size` examples, of which example `index` has `value` as its first input."""
    train = Regression(size, sigma, 0)
    train.x[index, 0] = value
    return train, Regression(256, sigma, 2)
