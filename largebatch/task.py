"""The task interface: what the trainer trains — datasets, a model builder, and a loss that counts its terms.

A batch is `(inputs, targets)`: inputs a tensor (called as `model(inputs)`) or a mapping of tensors
(`model(**inputs)`, e.g. input_ids and attention_mask for a Hugging Face model). A loss maps
`(output, targets)` to `(sum of loss terms, number of terms)`; the trainer sums both over the micro-steps
of a step and over ranks and divides once, so padded and variable-length data give the mean over the
global batch whatever the split (torchtitan's rule; a mean per micro-batch would not). With train.loss=model
the model computes its own mean loss from the targets, and the count of valid targets turns it into the sum.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, default_collate

from largebatch import factory, models
from largebatch.config import Config, mode
from largebatch.data import IGNORE_INDEX, Data, held_out
from largebatch.errors import UserError, check_choice
from largebatch.registry import DATASETS, FACTORY

Batch = tuple[Any, torch.Tensor]
LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]]


class Scored(NamedTuple):
    """One batch through the model and the loss."""

    total: torch.Tensor
    """Sum of the loss terms."""
    count: torch.Tensor
    """Number of loss terms (targets that are not the ignore index)."""
    output: Any
    """What the model returned."""


@dataclass
class Task:
    """Train/eval datasets, a model builder and a loss → (sum, count): everything that differs between jobs."""

    data: Data
    build_model: Callable[[], nn.Module]
    loss: LossFn
    ignore_index: int = IGNORE_INDEX
    """The target value that is no loss term (train.ignore_index)."""

    @property
    def train(self) -> Dataset:
        return self.data.train

    @property
    def eval(self) -> Dataset | None:
        return self.data.eval

    def forward(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> Any:
        """The model on a batch, given the targets where it computes its own loss (train.loss=model)."""
        given = targets if isinstance(self.loss, ModelLoss) else None
        return forward(model, inputs, given, self.ignore_index)

    def score(self, model: nn.Module, inputs: Any, targets: torch.Tensor) -> Scored:
        """The batch's forward and loss: the one way training, evaluation and the measurements get a loss."""
        output = self.forward(model, inputs, targets)
        total, count = self.loss(output, targets)
        return Scored(total, count, output)


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, `.logits` (Hugging Face), `["logits"]`, or a tuple's
    first element (nanoGPT's (logits, loss))."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output.logits


def loss_of(output: Any) -> Any:
    """The loss in a model's output: a tuple's second element (nanoGPT), `.loss` (Hugging Face) or `["loss"]`."""
    if isinstance(output, (tuple, list)):
        return output[1] if len(output) > 1 else None
    if isinstance(output, dict):
        return output.get("loss")
    return getattr(output, "loss", None)


@dataclass(frozen=True)
class CrossEntropy:
    """Summed cross-entropy over every loss term (one per example, or per token) and the count of terms whose
    target is not `ignore_index`."""

    ignore_index: int = IGNORE_INDEX

    def __call__(self, output: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = targets.flatten()
        logits = logits_of(output).flatten(0, -2)
        total = F.cross_entropy(logits, flat, ignore_index=self.ignore_index, reduction="sum")
        return total, (flat != self.ignore_index).sum()


@dataclass(frozen=True)
class ModelLoss:
    """train.loss=model: the model's own mean loss over the targets that are not `ignore_index`, as a sum.

    Σ = mean × count, with the count taken from the targets, is exact when the model averages over exactly those
    targets (the same ignore rule); the trainer then divides Σ by the count of the global batch as for any loss,
    so a padded micro-batch weighs by its valid targets, not as one mean among others."""

    ignore_index: int = IGNORE_INDEX

    def __call__(self, output: Any, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = loss_of(output)
        if not isinstance(mean, torch.Tensor) or mean.numel() != 1:
            raise UserError(
                f"train.loss=model, but the model returned {type(output).__name__} without a scalar loss; "
                f"its forward must compute one from the targets (nanoGPT: forward(idx, targets) → (logits, "
                f"loss); Hugging Face: labels= → .loss), or unset train.loss"
            )
        count = (targets != self.ignore_index).sum()
        total = torch.where(count > 0, mean.reshape(()) * count, torch.zeros_like(mean.reshape(())))
        return total, count


def correct(
    output: Any, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(right, counted) arg-max predictions over the counted terms, as tensors (no host sync), or None if the
    output is not class logits."""
    try:
        logits = logits_of(output)
    except AttributeError:
        return None
    if targets.is_floating_point() or logits.shape[:-1] != targets.shape:
        return None
    valid = targets != ignore_index
    return ((logits.argmax(-1) == targets) & valid).sum(), valid.sum()


def forward(
    model: nn.Module,
    inputs: Any,
    targets: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Any:
    """The model on a batch's inputs: a tensor positionally, a mapping by name — or, for a forward that takes
    none of its names (nanoGPT's forward(idx, ...)), its input_ids alone (right padding is invisible to a causal
    model). With `targets` (train.loss=model), a Transformers model gets labels=targets, shift_labels=targets
    (the targets are already shifted, so it must not shift them again) and ignore_index; another model gets them
    as its second argument, or as labels= with a mapping."""
    module = _unwrapped(model)
    by_name = isinstance(inputs, dict) and _takes_names(type(module), tuple(inputs))
    if isinstance(inputs, dict) and not by_name:
        inputs = inputs["input_ids"]
    if targets is None:
        return model(**inputs) if by_name else model(inputs)
    if _is_transformers(module):
        labels = {"labels": targets, "shift_labels": targets, "ignore_index": ignore_index}
        return model(**inputs, **labels) if by_name else model(inputs, **labels)
    return model(**inputs, labels=targets) if by_name else model(inputs, targets)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside DDP's or DeepSpeed's wrapper (FSDP2 shards it in place)."""
    deepspeed = sys.modules.get("deepspeed")
    wrappers = (DistributedDataParallel, *([deepspeed.DeepSpeedEngine] if deepspeed else []))
    return model.module if isinstance(model, wrappers) else model


@functools.cache
def _takes_names(cls: type, names: tuple[str, ...]) -> bool:
    """Whether `cls.forward` takes keyword arguments `names` (or any keywords)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return True
    return any(p.kind == p.VAR_KEYWORD for p in params.values()) or any(n in params for n in names)


def _is_transformers(module: nn.Module) -> bool:
    """A Hugging Face transformers model (whose loss shifts `labels` itself unless given `shift_labels`)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (in mappings, tuples and lists) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def collate_of(dataset: Dataset) -> Callable[[list], Any]:
    """A dataset's own `collate` (our in-memory sets, padded text) or torch's default."""
    return getattr(dataset, "collate", None) or default_collate


def take(dataset: Dataset, indices: Sequence[int]) -> Batch:
    """Examples `indices` of `dataset` as one collated batch, as a DataLoader without workers fetches them (plain
    indices come without training-time augmentation; (seed, epoch, index) draws with it)."""
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(indices)) if getitems else [dataset[i] for i in indices]
    return collate_of(dataset)(items)


def build(
    cfg: Config,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    train_data: Dataset | None = None,
    eval_data: Dataset | None = None,
    loss: LossFn | None = None,
) -> Task:
    """The task a config describes — its data (opened now), model builder and loss — or, for the Python API,
    the objects given in their place."""
    if eval_data is not None and train_data is None:
        raise UserError("eval_data needs train_data: pass both, or neither to use data.name")
    if train_data is not None:
        data = user_data(
            (train_data, eval_data) if eval_data is not None else train_data,
            cfg.data.name,
            cfg.data.eval_fraction,
            cfg.data.seed,
        )
    else:
        data = build_data(cfg)
    ignore_index = cfg.train.ignore_index
    if loss is None and cfg.train.loss == "model":
        loss = ModelLoss(ignore_index)
    elif loss is None and cfg.train.loss and ":" not in cfg.train.loss:
        raise UserError(
            f"train.loss={cfg.train.loss} is neither model (the model computes its own loss from the "
            f"targets) nor pkg.module:callable; unset it for cross-entropy"
        )
    elif loss is None:
        loss = (
            factory.resolve("train.loss", cfg.train.loss, cfg.origin)
            if cfg.train.loss
            else CrossEntropy(ignore_index)
        )
    if model is None:
        build_model = functools.partial(models.build, cfg.model, data, cfg.origin)
    else:
        build_model = functools.partial(models.wrap, cfg.model, model, cfg.model.args, data)
    return Task(data, build_model, loss, ignore_index)


def build_data(cfg: Config) -> Data:
    """Call the dataset builder `data.name` names with its keys (registry.DATASETS) as plain keyword arguments."""
    c = cfg.data
    if (
        mode("data.name", c.name) == FACTORY
    ):  # its data.args are in the checkpoint identity with the other keys
        made = factory.call(
            "data.args", factory.resolve("data.name", c.name, cfg.origin), c.args, c.name
        )
        return user_data(made, c.name, c.eval_fraction, c.seed)
    entry = DATASETS[check_choice("data.name", c.name, [n for n in DATASETS if n != FACTORY])]
    builder = entry.load()
    keys = [k.split(".")[1] for k in entry.keys]
    takes = inspect.signature(builder).parameters
    extra = {"seed": c.seed, "ignore_index": cfg.train.ignore_index}
    return builder(
        **{k: getattr(c, k) for k in keys}, **{k: v for k, v in extra.items() if k in takes}
    )


def user_data(made: Any, name: str, eval_fraction: float, seed: int) -> Data:
    """A user's dataset: a (train, eval) pair, or one Dataset of which a seeded `eval_fraction` is held out."""
    pair = isinstance(made, (tuple, list)) and len(made) == 2
    for split in made if pair else [made]:
        if not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
            raise UserError(
                f"data.name={name!r} gave a {type(split).__name__}; it must be a map-style "
                f"Dataset (with __len__ and __getitem__) or a (train, eval) pair of them"
            )
    train, held = made if pair else held_out(made, eval_fraction, seed)
    if len(train) == 0:
        raise UserError(f"data.name={name!r} returned an empty training set")
    fingerprint = getattr(train, "fingerprint", None)
    text = (
        fingerprint()
        if callable(fingerprint)
        else f"{name} {type(train).__name__} {len(train)} {len(held)}"
    )
    return Data(
        train,
        held,
        num_classes=getattr(train, "num_classes", None),
        fingerprint=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


CHECK_EXAMPLES = 2
"""Training examples the start check runs. Two is the smallest batch with a batch dimension to get wrong (a batch of
one survives a squeeze or a reshape that assumes one example, and slicing keeps it contiguous), and it costs little on
the CPU whatever the model and however large (or `auto`) the micro-batch is; evaluation runs batches of two or more
anyway."""


def check(task: Task, model: nn.Module, name: str) -> None:
    """Run two training examples through `model`, the loss and a backward, in training mode, so a shape or layout bug
    is one line before training. `model` is the instance that trains: the check leaves no trace on it."""
    with _leaves_no_trace(model):
        try:
            batch = take(task.train, range(min(CHECK_EXAMPLES, len(task.train))))
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UserError(
                    f"a batch of the training data is a {type(batch).__name__}, not (inputs, targets); "
                    f"make the dataset's items (inputs, targets) pairs, or give it a collate that returns one"
                )
            inputs, targets = batch
            output = task.forward(model, inputs, targets)
            if isinstance(task.loss, CrossEntropy):
                _check_logits(output, targets, task.data.num_classes, task.ignore_index)
            result = task.loss(output, targets)
            if not (
                isinstance(result, (tuple, list))
                and len(result) == 2
                and isinstance(result[0], torch.Tensor)
                and result[0].numel() == 1
            ):
                raise UserError(
                    "the loss must return (sum of loss terms as a scalar tensor, number of terms), "
                    f"got {type(result).__name__}; see train.loss in docs/your-model-and-data.md"
                )
            if not result[0].requires_grad:
                raise UserError(
                    f"the loss of model.name={name} has no gradient (no trainable parameter reaches it); "
                    f"check that the model's parameters require grad and the loss is computed from its output"
                )
            result[0].backward()
        except UserError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            hint = (
                f", and that its loss ignores targets of train.ignore_index={task.ignore_index} (nanoGPT's: -1)"
                if isinstance(task.loss, ModelLoss)
                else ""
            )
            raise UserError(
                f"model.name={name} does not fit the data: a batch of {CHECK_EXAMPLES} training examples fails "
                f"in the model, the loss or the backward ({type(exc).__name__}: {first}); check the model's "
                f"inputs and outputs{hint}"
            ) from None


@contextlib.contextmanager
def _leaves_no_trace(model: nn.Module) -> Iterator[None]:
    """Put `model` in training mode for the block, then back as it was: its buffers (BatchNorm statistics), gradients,
    modes and the CPU random generator (dropout) — a seeded run trains as if the block never ran."""
    buffers = {key: value.detach().clone() for key, value in model.named_buffers()}
    grads = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        # The model is still on the CPU: CUDA's generators stay untouched (and uninitialised).
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        with torch.no_grad():
            for key, value in model.named_buffers():
                if key in buffers:
                    value.copy_(buffers[key])
        for param, grad in grads:
            param.grad = grad
        for module, training in modes:
            module.training = training


def _check_logits(
    output: Any, targets: torch.Tensor, num_classes: int | None, ignore_index: int
) -> None:
    if isinstance(output, (tuple, list)) or loss_of(output) is not None:
        raise UserError(
            f"the model returns a {type(output).__name__}, not logits; if it computes its own loss from "
            f"targets (nanoGPT's forward(idx, targets) → (logits, loss)), set train.loss=model; otherwise "
            f"return the logits, or set train.loss to a loss that reads the output"
        )
    try:
        logits = logits_of(output)
    except (AttributeError, KeyError, TypeError):
        raise UserError(
            f"the model returns a {type(output).__name__}, not logits; return a tensor of class scores, "
            f"or set train.loss to a loss that reads it"
        ) from None
    if targets.is_floating_point() or logits.shape[:-1] != targets.shape:
        raise UserError(
            f"model output of shape {list(logits.shape)} does not fit targets of shape "
            f"{list(targets.shape)} (cross-entropy wants [..., classes] for integer targets [...]); "
            f"fix the model's output size, or set train.loss"
        )
    valid = targets != ignore_index
    top = int(targets[valid].max()) if valid.any() else -1
    needed = max(top + 1, num_classes or 0)
    if logits.shape[-1] < needed:
        raise UserError(
            f"the model outputs {logits.shape[-1]} classes but the data has {needed}; "
            f"give the model {needed} outputs (e.g. model.args.num_classes={needed}) or set train.loss"
        )
