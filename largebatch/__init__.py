"""largebatch: distributed large-batch training on PyTorch with one global-batch contract."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`largebatch.train`, imported on first use so that `import largebatch` stays light."""
    if name == "train":
        from largebatch.api import train

        return train
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")
