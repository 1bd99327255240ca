"""JSON lines of text with variable lengths, padded per micro-batch: the data that shows why the loss is counted.

Each line's `data.text_key` field is tokenised once at start — as UTF-8 bytes (tokens 0-255) or by a local
Hugging Face tokenizer — and cut to `data.context` + 1 tokens. Inputs are `{"input_ids", "attention_mask"}`
(a model that takes those, e.g. any hf: causal LM; a forward that takes neither gets input_ids alone, which
right padding keeps exact for a causal model); targets are the tokens shifted by one, with padding set to
train.ignore_index, so a padded position adds no loss term and is not counted. The vocabulary size is 256 for
bytes, len(tokenizer) otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from largebatch.data import IGNORE_INDEX, Data, file_fingerprint, require_path
from largebatch.errors import UserError, require

WHAT = 'a file of JSON lines such as {"text": "..."}'


class PaddedText(Dataset):
    """Token sequences of different lengths; `collate` pads a batch to its longest example."""

    def __init__(
        self, sequences: list[list[int]], pad_id: int, ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.sequences, self.pad_id, self.ignore_index = sequences, pad_id, ignore_index

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> list[int]:
        return self.sequences[index]

    def collate(self, batch: list[list[int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        longest = max(len(s) for s in batch) - 1
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        targets = torch.full((len(batch), longest), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, seq in enumerate(batch):
            n = len(seq) - 1
            ids[row, :n] = torch.tensor(seq[:-1])
            targets[row, :n] = torch.tensor(seq[1:])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}, targets


def _tokenizer(name: str) -> tuple[Any, int, int]:
    """(encode, vocabulary size, pad id) for `data.tokenizer`."""
    if name == "bytes":
        return (lambda text: list(text.encode())), 256, 0
    if not Path(name).is_dir():
        raise UserError(
            f"data.tokenizer={name} is neither 'bytes' nor a local tokenizer folder "
            f"(tokenizer.save_pretrained(...) writes one); nothing is downloaded"
        )
    transformers = require("transformers", "hf", f"data.tokenizer={name}")
    tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    return (lambda text: tok(text)["input_ids"]), len(tok), pad


def build(
    path: str | None,
    eval_fraction: float,
    context: int,
    tokenizer: str,
    text_key: str,
    ignore_index: int = IGNORE_INDEX,
) -> Data:
    file = require_path(path, "jsonl", WHAT)
    encode, vocab, pad = _tokenizer(tokenizer)
    sequences = []
    with file.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_key]
            except (json.JSONDecodeError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise UserError(
                    f"{file}:{number} is not a JSON object with a text {text_key!r} field (data.text_key)"
                )
            tokens = encode(text)[: context + 1]
            if len(tokens) >= 2:
                sequences.append(tokens)
    if len(sequences) < 2:
        raise UserError(
            f"data.path={file} has {len(sequences)} line(s) of 2 or more tokens; it should be {WHAT}"
        )
    cut = round(len(sequences) * (1 - eval_fraction))
    if cut == 0:
        raise UserError(
            f"data.path={file} has {len(sequences)} usable lines, none left for training after "
            f"data.eval_fraction={eval_fraction}; lower it or add data"
        )
    return Data(
        PaddedText(sequences[:cut], pad, ignore_index),
        PaddedText(sequences[cut:], pad, ignore_index),
        None,
        vocab,
        file_fingerprint(file),
        vocab_size=vocab,
        context=context,
    )
