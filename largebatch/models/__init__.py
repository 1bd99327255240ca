"""Model registry: built-in models, torchvision:<name>, hf:<name-or-dir>, or a user's pkg.module:callable.

Built-in builders take plain keyword arguments (the input shape and class count from the data, and their
MODE_KEYS model keys); the wrappers every model can get (SyncBatchNorm, gradient checkpointing) are applied here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from largebatch import factory
from largebatch.config import FACTORY, MODE_KEYS, ModelConfig, mode
from largebatch.errors import UserError, check_choice
from largebatch.models import checkpointing, gpt, hub, mlp, resnet

BUILDERS = {"mlp": mlp.build, "resnet": resnet.build, "gpt": gpt.build}
BLOCKS: dict[str, tuple[type[nn.Module], ...]] = {
    "resnet": (resnet.BasicBlock,),
    "gpt": (gpt.Block,),
}
"""What gradient checkpointing wraps, per built-in model (hub models: see hub.checkpoint_blocks)."""


def build(
    cfg: ModelConfig,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    origin: str | None = None,
) -> nn.Module:
    """The model `cfg.name` names, for data of `input_shape` with `num_classes` classes (None where unknown)."""
    if mode("model.name", cfg.name) == FACTORY:
        return wrap(cfg, factory.resolve("model.name", cfg.name, origin), cfg.args)
    if cfg.name.startswith("torchvision:"):
        model = hub.torchvision(cfg.name.removeprefix("torchvision:"), cfg.args, num_classes)
    elif cfg.name.startswith("hf:"):
        model = hub.hf(cfg.name.removeprefix("hf:"), cfg.args, num_classes)
    else:
        model = _builtin(cfg, input_shape, num_classes)
    return wrap(cfg, model)


def wrap(
    cfg: ModelConfig,
    model: nn.Module | Callable[..., nn.Module],
    args: dict[str, Any] | None = None,
) -> nn.Module:
    """A user's model (or the module its builder returns, called with `args`) with the wrappers the config asks for:
    SyncBatchNorm, gradient checkpointing."""
    if cfg.norm == "syncbatch" and not torch.cuda.is_available():
        raise UserError(
            "model.norm=syncbatch needs CUDA (SyncBatchNorm runs on NCCL); use batch or group on CPU"
        )
    if not isinstance(model, nn.Module):
        model = factory.call("model.args", model, args or {}, cfg.name)
        if not isinstance(model, nn.Module):
            raise UserError(
                f"model.name={cfg.name} returned a {type(model).__name__}, not a torch.nn.Module"
            )
    if cfg.norm == "syncbatch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.grad_checkpointing:
        _checkpoint(model, cfg, int(cfg.grad_checkpointing))
    return model


def _builtin(
    cfg: ModelConfig, input_shape: tuple[int, ...] | None, num_classes: int | None
) -> nn.Module:
    check_choice(
        "model.name", cfg.name, [*BUILDERS, "torchvision:<name>", "hf:<name-or-dir>", FACTORY]
    )
    if input_shape is None or num_classes is None:
        raise UserError(
            f"model.name={cfg.name} is built for the built-in datasets (it needs their input shape and "
            f"class count); use torchvision:<name>, hf:<name-or-dir> or your own pkg.module:callable"
        )
    base = "batch" if cfg.norm == "syncbatch" else cfg.norm
    options = {
        k.split(".")[1]: getattr(cfg, k.split(".")[1]) for k in MODE_KEYS["model.name"][cfg.name]
    }
    return BUILDERS[cfg.name](
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
    blocks = BLOCKS.get(cfg.name) or hub.checkpoint_blocks(cfg.name)
    if not blocks or not checkpointing.apply(model, blocks, every):
        raise UserError(
            f"model.grad_checkpointing found no blocks to recompute in {cfg.name} (it knows "
            f"{', '.join(BLOCKS)}, torchvision ResNets/ViTs/ConvNeXts and hf: models)"
        )
