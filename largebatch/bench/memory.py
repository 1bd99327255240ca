"""Gradient checkpointing's trade: activation memory saved for backward vs step time, on the tiny GPT and the CNN.

Activation memory is the bytes autograd holds for backward at the end of the forward pass (counted with
`saved_tensors_hooks`; with checkpointing, backward transiently recomputes one block's activations on top).
Step time is the median of forward + backward + optimizer step. Goal: ≤ 0.5× the memory at ≤ 1.4× the time.

`--engines ddp,deepspeed,fsdp` measures the engines instead, in one torchrun job (gloo on CPU): the bytes of
parameters, gradients and optimizer state each rank holds in one AdamW step of the tiny GPT, under DDP, DeepSpeed ZeRO
0-3 and FSDP2, counted from the tensors themselves (each storage once; a DTensor by its local shard).
Gradients are counted after backward, before the step frees them; optimizer state after the step creates it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from largebatch import bench, config, job, trainer
from largebatch import task as tasks
from largebatch.bench import run_workers
from largebatch.dist import DistInfo, all_reduce_sum
from largebatch.engine import Engine
from largebatch.errors import check_choice
from largebatch.memory import ActivationMeter
from largebatch.optim.sharding import local

WORKLOADS = {
    "gpt": (
        "data.name=text",
        "data.context=128",
        "model.name=gpt",
        "model.width=128",
        "model.depth=4",
        "model.heads=4",
    ),
    "resnet": (
        "data.name=synthetic",
        "data.size=256",
        "data.shape=[3,32,32]",
        "model.name=resnet",
        "model.norm=group",
        "model.width=32",
        "model.depth=2",
    ),
}
ALL_PARAMS_SHARDED = "engine.ds_config={zero_optimization: {stage3_param_persistence_threshold: 0}}"
"""ZeRO-3 keeps parameters under 100k elements whole on every rank by default: all of the tiny GPT's."""
ENGINES = {
    "ddp": {"DDP": ("engine.name=ddp",)},
    "deepspeed": {
        f"ZeRO-{s}": ("engine.name=deepspeed", f"engine.zero_stage={s}", ALL_PARAMS_SHARDED)
        for s in range(4)
    },
    "fsdp": {"FSDP": ("engine.name=fsdp",)},
}
"""--engines names → the rows they add: row name → config overrides."""
GRADIENT_PARTITIONS = ("averaged_gradients", "grad_partitions_flat_buffer")
"""Where DeepSpeed's ZeRO optimizer holds this rank's reduced gradients (stages 1-3; stage 3's are views of its flat
buffer), beside `param.grad`."""
MASTER_PARTITIONS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
"""Its fp32 master copy of this rank's parameter partition (stages 1-2, 3)."""
COLUMNS = ("params", "grads", "master", "moments")


def measure(
    overrides: tuple[str, ...], micro: int, checkpointing: bool, steps: int
) -> tuple[int, float]:
    """(activation bytes, median seconds per step)."""
    cfg = config.load(None, [*overrides, f"model.grad_checkpointing={str(checkpointing).lower()}"])
    task = tasks.build(cfg)
    torch.manual_seed(0)
    model = task.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = tasks.take(task.train, range(micro))
    meter = ActivationMeter()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with meter.track(model):
            total, count, _ = task.score(model, x, y)
            loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return meter.bytes, statistics.median(times[1:])


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in `value`: a tensor, or lists, tuples and dicts of them (None holds none)."""
    if isinstance(value, torch.Tensor):
        yield local(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors(item)
    elif isinstance(value, dict):
        yield from tensors(list(value.values()))


def storage_bytes(held: Iterator[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind `held` that are not in `seen` (storage addresses, updated): views count once."""
    total = 0
    for tensor in held:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def engine_bytes(engine: Engine, task: tasks.Task, micro: int) -> dict[str, int]:
    """Bytes this rank holds in one step: gradients after backward; after the step, parameters (ZeRO-3: their
    partitions, `ds_tensor`), the fp32 master partitions not shared with them, and the torch optimizer's state."""
    zero = getattr(getattr(engine, "ds", None), "optimizer", None)
    params = list(engine.module.parameters())
    x, y = tasks.take(task.train, range(micro))
    with engine.micro_step(True):
        with engine.autocast():
            total, count, _ = task.score(engine.model, x, y)
        loss = total / count
        engine.backward(loss)
    grads = [p.grad for p in params] + [getattr(zero, name, None) for name in GRADIENT_PARTITIONS]
    held = {"grads": storage_bytes(tensors(grads), set())}
    share = engine.norm_share()
    engine.step(loss.item(), None, 0.0 if share is None else all_reduce_sum(share).item())
    seen: set[int] = set()
    held["params"] = storage_bytes(tensors([getattr(p, "ds_tensor", p) for p in params]), seen)
    held["master"] = storage_bytes(
        tensors([getattr(zero, name, None) for name in MASTER_PARTITIONS]), seen
    )
    held["moments"] = storage_bytes(tensors(list(engine.optimizer.state.values())), seen)
    return held


def measure_engine(overrides: tuple[str, ...], micro: int, info: DistInfo) -> dict[str, int]:
    """`engine_bytes` of the tiny GPT under `overrides`, the largest over ranks (collective)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.load(
            None,
            [
                *WORKLOADS["gpt"],
                "optim.name=adamw",
                f"batch.global_size={micro * info.world_size}",
                f"batch.micro_size={micro}",
                f"run.dir={tmp}",
                *overrides,
            ],
        )
        prepared = job.prepare(cfg, info.world_size)
        held = engine_bytes(trainer.build_state(prepared, info).engine, prepared.task, micro)
    largest = torch.tensor([held[c] for c in COLUMNS])
    torch.distributed.all_reduce(largest, torch.distributed.ReduceOp.MAX)
    return dict(zip(COLUMNS, largest.tolist()))


def worker(names: list[str], micro: int) -> None:
    """Runs under torchrun: measure each engine in turn; rank 0 prints one JSON line."""
    from largebatch import dist

    info = dist.from_env()
    dist.init(info, always=True)
    rows = {
        row: measure_engine(overrides, micro, info)
        for name in names
        for row, overrides in ENGINES[name].items()
    }
    dist.teardown()
    if info.is_main:
        print(json.dumps(rows))


def print_engines(rows: dict[str, dict[str, int]], nproc: int, micro: int) -> None:
    """The table in MiB per rank, and each row's ratios to ZeRO-0's (or the first row's)."""
    base_name = "ZeRO-0" if "ZeRO-0" in rows else next(iter(rows))
    base = rows[base_name]
    print(
        f"tiny GPT, AdamW, micro-batch {micro}, {nproc} processes; MiB per rank (the largest rank) in one step; "
        f"ZeRO-3 partitions every parameter (stage3_param_persistence_threshold=0)"
    )
    print(
        f"{'engine':8} {'params':>7} {'grads':>7} {'master':>7} {'moments':>7} {'total':>7}   ÷ {base_name}: "
        f"{'params':>6} {'grads':>6} {'moments':>7} {'optimizer':>9}"
    )
    for name, r in rows.items():
        mib = " ".join(f"{v / 2**20:7.2f}" for v in (*(r[c] for c in COLUMNS), sum(r.values())))
        optimizer = (r["master"] + r["moments"]) / (base["master"] + base["moments"])
        print(
            f"{name:8} {mib}   {'':{len(base_name) + 4}}{r['params'] / base['params']:6.2f} "
            f"{r['grads'] / base['grads']:6.2f} {r['moments'] / base['moments']:7.2f} {optimizer:9.2f}"
        )
    print(
        "master: DeepSpeed's fp32 copy of the rank's parameter partition (ZeRO 1-3, fp32 parameters too); "
        "optimizer = master + moments"
    )
    print(
        f"expected ≈ 1/{nproc}: moments at ZeRO 1-3, grads at 2-3, params at 3 and all three under FSDP; not counted: "
        "DDP's gradient buckets (held in C++), FSDP's all-gathered block during its forward and backward"
    )


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser("memory", __doc__)
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per measurement (after one warm-up)"
    )
    parser.add_argument("--micro", type=int, default=32, help="micro-batch size")
    parser.add_argument(
        "--engines", help=f"measure these engines instead, comma-separated: {', '.join(ENGINES)}"
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes with --engines (default 2)")
    args = parser.parse_args(argv)
    if args.engines:
        names = [check_choice("--engines", name, list(ENGINES)) for name in args.engines.split(",")]
        rows = run_workers("largebatch.bench.memory", args.nproc, ",".join(names), str(args.micro))
        if rows is None:
            return 1
        print_engines(rows, args.nproc, args.micro)
        return 0
    print(
        f"micro-batch {args.micro}, {torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    print(
        f"{'model':8} {'activations':>14} {'with ckpt':>12} {'ratio':>7} {'step ms':>9} {'with ckpt':>10} {'ratio':>7}"
    )
    for name, overrides in WORKLOADS.items():
        plain_bytes, plain_s = measure(overrides, args.micro, False, args.steps)
        ckpt_bytes, ckpt_s = measure(overrides, args.micro, True, args.steps)
        print(
            f"{name:8} {plain_bytes / 2**20:>10.1f} MiB {ckpt_bytes / 2**20:>8.1f} MiB "
            f"{ckpt_bytes / plain_bytes:>7.2f} "
            f"{plain_s * 1e3:>9.1f} {ckpt_s * 1e3:>10.1f} {ckpt_s / plain_s:>7.2f}"
        )
    print("goal: activations ≤ 0.5× at step time ≤ 1.4×")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2].split(","), int(sys.argv[3]))
    else:
        sys.exit(main())
