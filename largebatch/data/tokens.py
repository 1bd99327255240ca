"""A flat binary token file — what nanoGPT's prepare scripts write (uint16, or uint32 for vocabularies > 65536) —
cut into fixed windows like Megatron's GPT dataset (not random offsets, so the sampler's contract holds).

Example i is tokens[i·stride : i·stride + context + 1]: the model sees the first `context` tokens and is
scored on the same window shifted by one. `data.path` is the file (its last `eval_fraction` of tokens held
out) or a folder with train.bin and val.bin. The vocabulary size is `vocab_size` from nanoGPT's meta.pkl beside
the file(s), else the largest token + 1.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from largebatch.data import Data, file_fingerprint, require_path
from largebatch.errors import UserError

WHAT = "a flat binary token file (e.g. nanoGPT's train.bin) or a folder with train.bin and val.bin"
SCAN_LIMIT = 1 << 30
"""Files up to this size are scanned for their largest token (the vocabulary size built-in models need)."""


class TokenWindows(Dataset):
    """Windows of `context` + 1 tokens from [start, end) of a memory-mapped token file, `stride` apart."""

    def __init__(
        self, path: Path, dtype: str, context: int, stride: int, start: int, end: int
    ) -> None:
        self.path, self.dtype, self.context, self.stride, self.start = (
            path,
            dtype,
            context,
            stride,
            start,
        )
        self.n = max(0, (end - start - context - 1) // stride + 1)
        self._tokens: np.memmap | None = (
            None  # opened lazily, so each DataLoader worker maps its own
        )

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        """Workers map the file themselves (pickling an open memmap would copy it)."""
        return {**self.__dict__, "_tokens": None}

    def _window(self, index: int) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        first = self.start + index * self.stride
        return self._tokens[first : first + self.context + 1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        window = torch.from_numpy(self._window(index).astype(np.int64))
        return window[:-1].contiguous(), window[1:].contiguous()

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(np.stack([self._window(i) for i in indices]).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # a model may .view() them

    @staticmethod
    def collate(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch


def _tokens(path: Path, dtype: str) -> int:
    """The number of tokens in `path`, checking its size against the dtype."""
    size, item = path.stat().st_size, np.dtype(dtype).itemsize
    if size % item:
        other = "uint32" if dtype == "uint16" else "uint16"
        raise UserError(
            f"data.path={path} has {size} bytes, not a multiple of {item} (data.dtype={dtype}); "
            f"is it {other}, or cut short?"
        )
    return size // item


def build(
    path: str | None, eval_fraction: float, context: int, dtype: str, stride: int | None
) -> Data:
    root = require_path(path, "tokens", WHAT)
    stride = stride or context
    if root.is_dir():
        files = [root / "train.bin", root / "val.bin"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(
                f"data.path={root} is a folder without {' and '.join(missing)}; it should be {WHAT}"
            )
        train_end, held_end = _tokens(files[0], dtype), _tokens(files[1], dtype)
        train = TokenWindows(files[0], dtype, context, stride, 0, train_end)
        held = TokenWindows(files[1], dtype, context, context, 0, held_end)
    else:
        files = [root]
        total = _tokens(root, dtype)
        cut = round(total * (1 - eval_fraction))
        train = TokenWindows(root, dtype, context, stride, 0, cut)
        held = TokenWindows(root, dtype, context, context, cut, total)
    if len(train) == 0:
        raise UserError(
            f"data.path={root} has too few training tokens for one example of data.context={context} "
            f"+ 1 tokens; lower data.context or use a larger file"
        )
    vocab = _meta_vocab(files[0].parent / "meta.pkl")
    if vocab is None and files[0].stat().st_size <= SCAN_LIMIT:
        vocab = (
            int(max(np.memmap(f, dtype=dtype, mode="r").max() for f in files if f.stat().st_size))
            + 1
        )
    return Data(
        train,
        held,
        (context,),
        vocab,
        file_fingerprint(*files),
        vocab_size=vocab,
        context=context,
    )


class _PlainUnpickler(pickle.Unpickler):
    """Reads only plain values (dicts, strings, numbers): a meta.pkl cannot run code."""

    def find_class(self, module: str, name: str) -> type:
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain value")


def _meta_vocab(path: Path) -> int | None:
    """`vocab_size` from nanoGPT's meta.pkl (a pickled dict with vocab_size, itos, stoi), if there is one."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            meta = _PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(
            f"{path} is not a pickled dict of plain values as nanoGPT writes it ({exc}); remove it or "
            f"rewrite it with vocab_size"
        ) from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{path} has no positive integer vocab_size; add one, or remove the file")
    return vocab
