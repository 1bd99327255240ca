"""Models from torchvision (`torchvision:<name>`) and Hugging Face transformers (`hf:<name-or-dir>`), never
downloaded: torchvision models start from their own initialisation, hf: models from a local config or directory."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from torch import nn

from largebatch.errors import UserError, check_choice, require

HF_HEADS = {
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
}
"""model.args.head for hf: models (default: from the config's architectures, else causal-lm)."""


def torchvision(name: str, args: dict[str, Any], num_classes: int | None) -> nn.Module:
    """`torchvision.models.get_model(name, **args)`; num_classes defaults to the data's class count."""
    require("torchvision", "vision", "model.name=torchvision:<name>")
    import torchvision.models

    known = torchvision.models.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = (
            f"did you mean torchvision:{close[0]}?"
            if close
            else "torchvision.models.list_models() lists them"
        )
        raise UserError(f"model.name=torchvision:{name} is not a torchvision model; {hint}")
    if args.get("weights"):
        raise UserError(
            "model.args.weights would download pretrained weights; load them from a local file in your "
            "own pkg.module:callable model builder instead"
        )
    args = {"num_classes": num_classes, **args} if num_classes is not None else dict(args)
    try:
        return torchvision.models.get_model(name, **args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model.args={args} does not fit torchvision:{name} ({exc})") from None


def checkpoint_blocks(name: str) -> tuple[type[nn.Module], ...]:
    """The block classes gradient checkpointing wraps in a torchvision model (empty for others)."""
    if not name.startswith("torchvision:"):
        return ()
    from torchvision.models import convnext, resnet, vision_transformer

    return resnet.BasicBlock, resnet.Bottleneck, vision_transformer.EncoderBlock, convnext.CNBlock


def hf(
    spec: str, args: dict[str, Any], num_classes: int | None, vocab_size: int | None = None
) -> nn.Module:
    """A transformers model with a causal-LM, masked-LM or sequence-classification head, from a local directory,
    a model type (`hf:gpt2` is GPT-2 small's architecture, randomly initialised) or the local cache.

    `model.args`: `head`, `pretrained` (load the directory's weights; default false) and config fields to
    override (e.g. n_layer). The trainer computes the loss from the logits, or, with train.loss=model, passes the
    targets as labels and shift_labels (task.forward). A config vocabulary smaller than the data's is refused.
    """
    transformers = require("transformers", "hf", "model.name=hf:<name-or-dir>")
    args = dict(args)
    head = args.pop("head", None)
    pretrained = bool(args.pop("pretrained", False))
    config = _hf_config(transformers, spec, pretrained)
    unknown = [k for k in args if not hasattr(config, k)]
    if unknown:
        raise UserError(
            f"model.args has {', '.join(unknown)}, which {type(config).__name__} does not have; "
            f"use its config fields (e.g. {', '.join(list(config.to_diff_dict())[:4])})"
        )
    for key, value in args.items():
        setattr(config, key, value)
    model_vocab = getattr(config, "vocab_size", None)
    if vocab_size is not None and isinstance(model_vocab, int) and model_vocab < vocab_size:
        raise UserError(
            f"model.name=hf:{spec} has vocab_size {model_vocab}, less than the data's {vocab_size}; "
            f"set model.args.vocab_size={vocab_size} (or use the data's tokenizer)"
        )
    if head is None:
        archs = " ".join(config.architectures or [])
        head = next(
            (h for h, cls in HF_HEADS.items() if cls.removeprefix("AutoModelFor") in archs),
            "causal-lm",
        )
    auto = getattr(transformers, HF_HEADS[check_choice("model.args.head", head, list(HF_HEADS))])
    if head == "sequence-classification" and "num_labels" not in args and num_classes is not None:
        config.num_labels = num_classes
    try:
        if pretrained:
            return auto.from_pretrained(spec, config=config, local_files_only=True)
        return auto.from_config(config)
    except (OSError, ValueError) as exc:  # no local weights; a head this model type does not have
        raise UserError(
            f"model.name=hf:{spec} with head {head}: {str(exc).strip().splitlines()[0]}"
        ) from None


def _hf_config(transformers: Any, spec: str, pretrained: bool) -> Any:
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise UserError(
                f"model.name=hf:{spec}: the directory has no config.json; save one with "
                f"config.save_pretrained('{spec}')"
            )
        return transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    if not pretrained and spec in transformers.CONFIG_MAPPING:
        return transformers.AutoConfig.for_model(spec)
    try:
        return transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    except OSError:
        raise UserError(
            f"model.name=hf:{spec} is neither a local directory with config.json, nor a model type "
            f"(e.g. hf:gpt2, hf:bert), nor in the local Hugging Face cache; nothing is downloaded"
        ) from None
