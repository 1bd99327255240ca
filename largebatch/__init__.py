"""largebatch: distributed large-batch training on PyTorch with one global-batch contract."""

__version__ = "0.1.0"
