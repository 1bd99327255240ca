"""Throughput an LLM user reads: valid target tokens per second and MFU (model FLOPs utilisation).

MFU = the model's training FLOPs per second ÷ the peak FLOP/s of the devices (Chowdhery et al. 2022, PaLM,
appendix B). Causal attention counts as dense, as in nanoGPT's `estimate_mfu` and torchtitan:
- GPT-style models (the built-in `gpt`; a model whose `config` has nanoGPT's n_layer/n_head/n_embd or
  transformers' num_hidden_layers/num_attention_heads/hidden_size; no mixture of experts) on token data:
  6·N + 12·L·H·Q·T per token, N the parameters a token is multiplied by (all but embedding tables, a table tied to
  the output layer counted once), L layers, H heads of width Q, T positions per sequence; forward + backward once,
  never recomputation (gradient checkpointing, flash attention's backward);
- any other model: torch.utils.flop_counter on one micro-batch, forward + backward, on a copy of the model on the
  meta device (no compute, and no trace on the trained model, its RNG or its buffers); it counts what runs, so a
  checkpointed block's recomputed forward too.
The peak is the sum over ranks of each device's: a GPU's dense peak for the training dtype from GPU_PEAKS by its
name, a CPU's measured once by a matmul at the run's thread count and dtype.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from largebatch.dist import DistInfo, all_reduce_sum
from largebatch.models.gpt import GPT, Block
from largebatch.task import Task, take, to_device

GPU_PEAKS: list[tuple[str, str, tuple[float, float, float]]] = [
    # (pattern in torch.cuda.get_device_name, the name said, dense TFLOP/s for bf16/fp16, tf32, fp32), from NVIDIA's
    # datasheets, which print tensor-core figures with 2:4 sparsity: those are halved here.
    (
        r"\bb200\b",
        "B200",
        (2250.0, 1125.0, 75.0),
    ),  # HGX B200 datasheet (8 GPUs: 36 PF bf16, 18 PF tf32 sparse)
    (r"\bh200\b.*\bnvl\b", "H200 NVL", (835.5, 417.5, 60.0)),  # H200 datasheet, NVL column
    (r"\bh200\b", "H200", (989.5, 494.5, 67.0)),  # H200 datasheet, SXM column
    (r"\bh100\b.*\bnvl\b", "H100 NVL", (835.5, 417.5, 60.0)),  # H100 datasheet, NVL column
    (r"\bh100\b.*\bpcie\b", "H100 PCIe", (756.5, 378.0, 51.0)),  # H100 datasheet, PCIe column
    (r"\bh100\b", "H100", (989.5, 494.5, 67.0)),  # H100 datasheet, SXM column
    (r"\ba100\b", "A100", (312.0, 156.0, 19.5)),  # A100 datasheet (SXM and PCIe)
    (r"\bl40s\b", "L40S", (362.0, 183.0, 91.6)),  # L40S datasheet
    (r"\bl4\b", "L4", (121.0, 60.0, 30.3)),  # L4 datasheet
    (r"\ba10\b", "A10", (125.0, 62.5, 31.2)),  # A10 datasheet (not the A10G, whose clocks differ)
]
"""Per-device dense peaks in TFLOP/s by GPU name; a GPU not listed gets no MFU (the start line says so)."""
CPU_MATMUL_SIZES = (256, 512, 1024)
"""The CPU peak is the best FLOP/s of matmuls of these sizes (the best size depends on the caches)."""
COUNTED_EXAMPLES = 16
"""At most this many examples of the micro-batch are counted (FLOPs per example do not depend on how many)."""
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Throughput:
    """What turns examples, valid target tokens and seconds into tokens/s and MFU."""

    token_task: bool
    """Targets are integer sequences (a class per position): tokens/s is reported."""
    flops_per_token: float | None = None
    """Training FLOPs per valid target token (the transformer formula), or None."""
    flops_per_example: float | None = None
    """Training FLOPs per example (counted on a micro-batch), or None."""
    peak: float | None = None
    """Peak FLOP/s of all ranks together, or None where unknown."""
    described: str = ""
    """How the FLOPs and the peak were found, for the start line."""

    def rates(self, examples: float, tokens: float, seconds: float) -> dict[str, float]:
        """`tokens_per_s` (token tasks) and `mfu` (where FLOPs and peak are known) over an interval."""
        seconds = max(seconds, 1e-9)
        out = {"tokens_per_s": tokens / seconds} if self.token_task else {}
        if self.peak:
            if self.flops_per_token is not None:
                out["mfu"] = self.flops_per_token * tokens / seconds / self.peak
            elif self.flops_per_example is not None:
                out["mfu"] = self.flops_per_example * examples / seconds / self.peak
        return out


def measure(
    module: nn.Module, task: Task, micro_batch: int, precision: str, info: DistInfo
) -> Throughput:
    """FLOPs per token or example of `module` on `task`, and the job's peak FLOP/s (collective: every rank calls it)."""
    inputs, targets = take(task.train, range(min(micro_batch, COUNTED_EXAMPLES, len(task.train))))
    token_task = (
        isinstance(targets, torch.Tensor) and targets.dim() >= 2 and not targets.is_floating_point()
    )
    per_token = per_example = None
    shape = transformer_shape(module) if token_task else None
    if shape is not None:
        layers, heads, head_dim = shape
        positions = targets.shape[-1]
        n = matmul_params(module)
        per_token = transformer_flops_per_token(n, layers, heads, head_dim, positions)
        how = (
            f"6·N + 12·L·H·Q·T = {_si(per_token)}FLOP per token (N {_si(n)}, L {layers}, "
            f"H {heads}, Q {head_dim}, T {positions})"
        )
    else:
        try:
            count = counted_flops(module, task.score, inputs, targets) / len(targets)
            per_example = count or None  # a model without matmuls or convolutions: nothing counted
            how = f"{_si(count)}FLOP per example (torch.utils.flop_counter, forward + backward)"
        except Exception as exc:  # noqa: BLE001 - MFU is a report, never a reason to stop training
            how = f"no FLOP count ({type(exc).__name__}: {str(exc).strip()[:120]})"
    mine, where = device_peak(info.device, precision)
    total = all_reduce_sum(torch.tensor(mine, dtype=torch.float64, device=info.device)).item()
    peak = total if math.isfinite(total) and total > 0 else None
    ranks = f"{info.world_size} ranks, {_si(total)}FLOP/s in all; " if info.world_size > 1 else ""
    if peak is None or (per_token is None and per_example is None):
        return Throughput(token_task, described=f"MFU not reported: {how}; {where}")
    return Throughput(
        token_task, per_token, per_example, peak, f"MFU from {how}, against {ranks}{where}"
    )


def transformer_flops_per_token(
    params: int, layers: int, heads: int, head_dim: int, positions: int
) -> float:
    """6·N + 12·L·H·Q·T: 2 FLOPs per multiply-add, ×3 for forward + backward, over the N matmul parameters and the
    two attention products (q·kᵀ and attention·v, each H·Q·T multiply-adds per token and layer, causal mask not
    subtracted)."""
    return 6 * params + 12 * layers * heads * head_dim * positions


def transformer_shape(module: nn.Module) -> tuple[int, int, int] | None:
    """(layers, heads, head width) of a GPT-style model, or None: the built-in GPT, or a model whose `config`
    names them as nanoGPT or transformers do (mixture-of-experts configs excluded: 6·N overcounts them)."""
    if isinstance(module, GPT):
        blocks = [m for m in module.modules() if isinstance(m, Block)]  # some may be Checkpointed
        return len(blocks), blocks[0].heads, module.token.embedding_dim // blocks[0].heads
    config = getattr(module, "config", None)
    if config is None or any(
        getattr(config, k, None) for k in ("num_local_experts", "num_experts", "n_routed_experts")
    ):
        return None
    layers, heads, width = (
        next((getattr(config, k) for k in names if isinstance(getattr(config, k, None), int)), None)
        for names in (
            ("num_hidden_layers", "n_layer"),
            ("num_attention_heads", "n_head"),
            ("hidden_size", "n_embd"),
        )
    )
    if not (layers and heads and width):
        return None
    head_dim = getattr(config, "head_dim", None)
    return layers, heads, head_dim if isinstance(head_dim, int) else width // heads


def matmul_params(module: nn.Module) -> int:
    """The parameters a token is multiplied by: all but embedding tables, except a table tied to a linear layer
    (the output head), counted once (torchtitan's convention; nanoGPT's get_num_params with a tied head)."""
    tied = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    lookups = {
        id(p)
        for m in module.modules()
        if isinstance(m, nn.Embedding)
        for p in m.parameters(recurse=False)
        if id(p) not in tied
    }
    return sum(_numel(p) for p in module.parameters() if id(p) not in lookups)


def counted_flops(module: nn.Module, score: Any, inputs: Any, targets: torch.Tensor) -> int:
    """Forward + loss + backward FLOPs of one batch, counted on a meta-device copy of `module`; `score(model,
    inputs, targets)` returns (sum of loss terms, ...), as Task.score does."""
    # imported here: it imports triton where installed (0.3 s), which a run without this count never needs
    from torch.utils.flop_counter import FlopCounterMode

    ghost = meta_copy(module)
    ghost.train()
    meta = torch.device("meta")
    with FlopCounterMode(display=False) as counter:
        total = score(ghost, to_device(inputs, meta), to_device(targets, meta))[0]
        total.backward()
    return counter.get_total_flops()


_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers are empty meta tensors of their full shape (sharded ones too),
    without hooks and with FSDP's class undone, so an engine's all-gathers and reductions stay with the original."""
    copies: dict[int, Any] = {}

    def meta(tensor: torch.Tensor | None, parameter: bool) -> torch.Tensor | None:
        if tensor is None:
            return None
        if id(tensor) not in copies:  # a tied tensor stays one tensor
            empty = _meta_like(tensor)
            copies[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if parameter else empty
        return copies[id(tensor)]

    def copy_of(m: nn.Module) -> nn.Module:
        if id(m) not in copies:
            new = object.__new__(_unsharded_class(m))
            new.__dict__.update(m.__dict__)
            new.__dict__.update({k: type(v)() for k, v in m.__dict__.items() if k in _HOOKS})
            new._parameters = {k: meta(p, True) for k, p in m._parameters.items()}
            new._buffers = {k: meta(b, False) for k, b in m._buffers.items()}
            new._modules = {k: c if c is None else copy_of(c) for k, c in m._modules.items()}
            copies[id(m)] = new
        return copies[id(m)]

    return copy_of(module)


def _unsharded_class(module: nn.Module) -> type:
    """The model's own class: fully_shard swaps a module's class for an FSDP subclass of it."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    shape = (
        getattr(tensor, "ds_shape", None) or tensor.shape
    )  # ZeRO-3 partitions; DTensor shapes are global
    return torch.empty(shape, dtype=tensor.dtype, device="meta")


def _numel(tensor: torch.Tensor) -> int:
    return getattr(tensor, "ds_numel", None) or tensor.numel()


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """This device's peak FLOP/s for `precision` (NaN where unknown) and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        column, said = (0, precision) if precision != "fp32" else (2, "fp32")
        if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
            column, said = 1, "tf32"
        for pattern, model, peaks in GPU_PEAKS:
            if re.search(pattern, name.lower()):
                return peaks[
                    column
                ] * 1e12, f"{peaks[column]:g} TFLOP/s per GPU ({model} {said}, table)"
        return math.nan, f"no peak FLOP/s known for {name} (largebatch/flops.py GPU_PEAKS)"
    flops, size = cpu_matmul_flops(DTYPES[precision], torch.get_num_threads())
    return flops, (
        f"{_si(flops)}FLOP/s per process measured by a {size}² {precision} matmul "
        f"at {torch.get_num_threads()} thread(s)"
    )


@functools.cache
def cpu_matmul_flops(dtype: torch.dtype, threads: int, budget_s: float = 0.15) -> tuple[float, int]:
    """The best FLOP/s of n×n matmuls in `dtype` at `threads` threads (the current count), and the n that gave it:
    each of CPU_MATMUL_SIZES repeated for a third of `budget_s`, up to the size after which one would take
    over 0.1 s (fp16 is slow on most CPUs). Measured once per process."""
    best, best_size = 0.0, CPU_MATMUL_SIZES[0]
    for size in CPU_MATMUL_SIZES:
        a, b = (
            torch.randn(size, size, generator=torch.Generator().manual_seed(i)).to(dtype)
            for i in (0, 1)
        )
        start = time.perf_counter()
        while True:
            began = time.perf_counter()
            torch.mm(a, b)
            took = time.perf_counter() - began
            if 2 * size**3 / took > best:
                best, best_size = 2 * size**3 / took, size
            if time.perf_counter() - start > budget_s / len(CPU_MATMUL_SIZES):
                break
        if 8 * took > 0.1:  # the next size would take 8 times as long
            break
    return best, best_size


def _si(value: float) -> str:
    """1.23 G, 456 M, ...: a figure with an SI prefix and a trailing space."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "
