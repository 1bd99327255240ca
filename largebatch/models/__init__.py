"""Model registry: built-in models, torchvision:<name>, hf:<name-or-dir>, or a user's pkg.module:callable.

Built-in builders take plain keyword arguments (the input shape and class count from the data, and the model keys
their registry.MODELS entry lists); a user's builder is told what the data knows (vocab_size, num_classes,
context/block_size, input_shape) when it asks by parameter name or through its config dataclass; the wrappers every
model can get (SyncBatchNorm, gradient checkpointing) are applied here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from largebatch import factory
from largebatch.config import ModelConfig, mode
from largebatch.data import Data
from largebatch.errors import UserError, check_choice
from largebatch.models import checkpointing, hub
from largebatch.registry import FACTORY, MODELS, Entry


def build(cfg: ModelConfig, data: Data, origin: str | None = None) -> nn.Module:
    """The model `cfg.name` names, for `data` (its input shape and class count, where known)."""
    input_shape, num_classes = data.input_shape, data.num_classes
    if mode("model.name", cfg.name) == FACTORY:
        return wrap(cfg, factory.resolve("model.name", cfg.name, origin), cfg.args, data)
    if cfg.name.startswith("torchvision:"):
        model = hub.torchvision(cfg.name.removeprefix("torchvision:"), cfg.args, num_classes)
    elif cfg.name.startswith("hf:"):
        model = hub.hf(cfg.name.removeprefix("hf:"), cfg.args, num_classes, data.vocab_size)
    else:
        model = _builtin(cfg, input_shape, num_classes)
    return wrap(cfg, model)


def wrap(
    cfg: ModelConfig,
    model: nn.Module | Callable[..., nn.Module],
    args: dict[str, Any] | None = None,
    data: Data | None = None,
) -> nn.Module:
    """A user's model (or the module its builder returns, called with `args` and the facts of `data` it asks for)
    with the wrappers the config asks for: SyncBatchNorm, gradient checkpointing."""
    if cfg.norm == "syncbatch" and not torch.cuda.is_available():
        raise UserError(
            "model.norm=syncbatch needs CUDA (SyncBatchNorm runs on NCCL); use batch or group on CPU"
        )
    if not isinstance(model, nn.Module):
        facts = data.facts() if data is not None else {}
        _check_facts(args or {}, facts)
        model = factory.call("model.args", model, args or {}, cfg.name, facts)
        if not isinstance(model, nn.Module):
            raise UserError(
                f"model.name={cfg.name} returned a {type(model).__name__}, not a torch.nn.Module"
            )
    if cfg.norm == "syncbatch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.grad_checkpointing:
        _checkpoint(model, cfg, int(cfg.grad_checkpointing))
    return model


def _check_facts(args: dict[str, Any], facts: dict[str, Any]) -> None:
    """A model.args value that contradicts the data: fewer classes or tokens, a shorter context, another shape."""
    words = {
        "vocab_size": "vocabulary",
        "num_classes": "class count",
        "context": "sequence length (data.context)",
        "block_size": "sequence length (data.context)",
    }
    for key, what in words.items():
        if key in args and key in facts and isinstance(args[key], int) and args[key] < facts[key]:
            raise UserError(
                f"model.args.{key}={args[key]} is less than the data's {what}, {facts[key]}; "
                f"remove it to take the data's, or raise it"
            )
    if "input_shape" in args and "input_shape" in facts:
        if tuple(args["input_shape"]) != tuple(facts["input_shape"]):
            raise UserError(
                f"model.args.input_shape={list(args['input_shape'])} is not the data's shape "
                f"{list(facts['input_shape'])}; remove it to take the data's"
            )


def _builtin(
    cfg: ModelConfig, input_shape: tuple[int, ...] | None, num_classes: int | None
) -> nn.Module:
    entry = MODELS[check_choice("model.name", cfg.name, list(MODELS))]
    if input_shape is None or num_classes is None:
        raise UserError(
            f"model.name={cfg.name} is built for the built-in datasets (it needs their input shape and "
            f"class count); use torchvision:<name>, hf:<name-or-dir> or your own pkg.module:callable"
        )
    base = "batch" if cfg.norm == "syncbatch" else cfg.norm
    options = {k.split(".")[1]: getattr(cfg, k.split(".")[1]) for k in entry.keys}
    return entry.load()(
        input_shape, num_classes, **(options | ({"norm": base} if "norm" in options else {}))
    )


def _checkpoint(model: nn.Module, cfg: ModelConfig, every: int) -> None:
    """Gradient checkpointing of every `every`-th block: ours for built-in and torchvision models, the model's own
    for Hugging Face ones."""
    if cfg.name.startswith("hf:"):
        if every != 1:
            raise UserError(
                "model.grad_checkpointing for hf: models is true (every layer), not every N-th"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    builtin = {name: _blocks(entry) for name, entry in MODELS.items() if entry.code}
    blocks = builtin.get(cfg.name) or hub.checkpoint_blocks(cfg.name)
    if not blocks or not checkpointing.apply(model, blocks, every):
        raise UserError(
            f"model.grad_checkpointing found no blocks to recompute in {cfg.name} (it knows "
            f"{', '.join(n for n, b in builtin.items() if b)}, torchvision ResNets/ViTs/ConvNeXts and "
            f"hf: models)"
        )


def _blocks(entry: Entry) -> tuple[type[nn.Module], ...]:
    """What gradient checkpointing wraps in a built-in model: its module's CHECKPOINT_BLOCKS."""
    return getattr(entry.module(), "CHECKPOINT_BLOCKS", ())
