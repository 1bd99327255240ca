"""Time one optimizer step over ResNet-50's parameter shapes for our LARS/LAMB and the baselines.

`--sharded` times them on the shards of 2 processes instead (torchrun, gloo): our LAMB and LARS on DTensors sharded
on dim 0 as FSDP2 shards them (whole-parameter norms from one all-reduce per step) against torch's fused AdamW and SGD,
DeepSpeed's CPU Adam (the optimizer of ZeRO-Offload) and our LAMB with per-shard norms (wrong; the cost floor),
stepping the same local shards as plain tensors.
"""

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from largebatch import bench
from largebatch.bench import run_workers
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS

_RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (width, bottleneck blocks)


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's resnet50, in model order (25,557,032 values)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in _RESNET50_STAGES:
        for block in range(blocks):
            out_ch = 4 * width
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if block == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    return shapes + [(1000, 2048), (1000,)]


def _param_groups(seed: int) -> list[dict]:
    """ResNet-50-shaped parameters with random gradients; 1-D tensors neither decay nor adapt."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in resnet50_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-4},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adapt": False},
    ]


def _candidates() -> dict[str, Callable[[list[dict]], Optimizer]]:
    candidates: dict[str, Callable[[list[dict]], Optimizer]] = {
        "torch SGD(fused)": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, fused=True),
        "torch SGD(foreach)": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, foreach=True),
        "torch AdamW(fused)": lambda g: torch.optim.AdamW(g, lr=1e-3, fused=True),
        "torch AdamW(foreach)": lambda g: torch.optim.AdamW(g, lr=1e-3, foreach=True),
        "LARS(fused)": lambda g: LARS(g, lr=0.1, impl="fused"),
        "LARS(foreach)": lambda g: LARS(g, lr=0.1, impl="foreach"),
        "LAMB(fused)": lambda g: LAMB(g, lr=1e-3, impl="fused"),
        "LAMB(foreach)": lambda g: LAMB(g, lr=1e-3, impl="foreach"),
    }
    try:
        import torch_optimizer

        candidates["torch_optimizer.LARS"] = lambda g: torch_optimizer.LARS(g, lr=0.1, momentum=0.9)
        candidates["torch_optimizer.Lamb"] = lambda g: torch_optimizer.Lamb(g, lr=1e-3)
    except ImportError:
        print("torch_optimizer: not importable")
    try:
        from timm.optim import Lamb as TimmLamb
        from timm.optim import Lars as TimmLars

        candidates["timm Lars"] = lambda g: TimmLars(g, lr=0.1, momentum=0.9)
        candidates["timm Lamb"] = lambda g: TimmLamb(g, lr=1e-3)
    except Exception:  # noqa: BLE001 - timm without torchvision fails with assorted errors
        print("timm: not importable")
    return candidates


def time_steps(optimizers: dict[str, Optimizer], steps: int, warmup: int) -> dict[str, float]:
    """Median wall time of one step() per optimizer, in milliseconds, after `warmup` untimed steps.

    The optimizers take turns, one step each per round, so that load from other processes hits all
    of them alike, and each step starts with caches full of another model's state, as it does
    after a backward pass.
    """
    for optimizer in optimizers.values():
        for _ in range(warmup):
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _sharded_groups(seed: int, shard: Callable[[torch.Tensor], torch.Tensor]) -> list[dict]:
    """`_param_groups` with every parameter and gradient replaced by `shard(tensor)` (the same values everywhere)."""
    groups = _param_groups(seed)
    for group in groups:
        sharded = []
        for p in group["params"]:
            q = torch.nn.Parameter(shard(p.detach()))
            q.grad = shard(p.grad)
            sharded.append(q)
        group["params"] = sharded
    return groups


def sharded_worker(steps: int, warmup: int) -> None:
    """Runs under torchrun: every candidate on this rank's shards; rank 0 prints the largest medians over ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from largebatch import dist as lbdist

    info = lbdist.from_env()
    lbdist.init(info, always=True)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (info.world_size,))
    dtensor = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    local = lambda t: dtensor(t).to_local().clone()  # noqa: E731 - this rank's shard as a plain tensor
    candidates: dict[str, Callable[[], Optimizer]] = {
        "torch AdamW(fused)": lambda: torch.optim.AdamW(
            _sharded_groups(0, local), lr=1e-3, fused=True
        ),
        "torch SGD(fused)": lambda: torch.optim.SGD(
            _sharded_groups(0, local), lr=0.1, momentum=0.9, fused=True
        ),
        "LAMB(fused)": lambda: LAMB(_sharded_groups(0, dtensor), lr=1e-3, impl="fused"),
        "LAMB(fused) local norms": lambda: LAMB(_sharded_groups(0, local), lr=1e-3, impl="fused"),
        "LAMB(foreach)": lambda: LAMB(_sharded_groups(0, dtensor), lr=1e-3, impl="foreach"),
        "LARS(fused)": lambda: LARS(_sharded_groups(0, dtensor), lr=0.1, impl="fused"),
    }
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        candidates["DeepSpeedCPUAdam"] = lambda: DeepSpeedCPUAdam(
            _sharded_groups(0, local), lr=1e-3, adamw_mode=True
        )
    except Exception as exc:  # noqa: BLE001 - no deepspeed, or its CPU Adam op does not build here
        print(f"DeepSpeedCPUAdam: not available ({type(exc).__name__})", file=sys.stderr)
    optimizers = {name: make() for name, make in candidates.items()}
    adapted = len(optimizers["LAMB(fused)"].param_groups[0]["params"])
    sums = torch.zeros(adapted, 2, dtype=torch.float64)
    ms = time_steps({**optimizers, "all-reduce": _AllReduce(sums)}, steps, warmup)
    largest = torch.tensor(list(ms.values()))
    dist.all_reduce(largest, dist.ReduceOp.MAX)
    lbdist.teardown()
    if info.is_main:
        print(
            json.dumps(
                {
                    "ms": dict(zip(ms, largest.tolist())),
                    "adapted": adapted,
                    "world": info.world_size,
                }
            )
        )


class _AllReduce:
    """Stands in for an optimizer in `time_steps`: the all-reduce of LAMB's per-parameter sums alone."""

    def __init__(self, sums: torch.Tensor) -> None:
        self.sums = sums

    def step(self) -> None:
        dist.all_reduce(self.sums)


def print_sharded(result: dict, steps: int) -> None:
    ms, world = result["ms"], result["world"]
    print(
        f"ResNet-50's shapes sharded on dim 0 over {world} processes (1 thread each), the slowest rank's median of "
        f"{steps} steps; our LARS/LAMB on DTensors, the others on the same local shards"
    )
    adamw = ms["torch AdamW(fused)"]
    print(f"{'optimizer':<24}{'ms/step':>9}{'/AdamW(fused)':>15}")
    for name, t in ms.items():
        print(f"{name:<24}{t:>9.2f}{t / adamw:>15.2f}")
    print(f"LAMB(fused)/AdamW(fused) on the shards = {ms['LAMB(fused)'] / adamw:.2f} (goal ≤ 1.6)")
    print(
        f"the all-reduce of {result['adapted']} per-parameter norm pairs (waiting for the slower rank included): "
        f"{ms['all-reduce']:.3f} ms, {ms['all-reduce'] / ms['LAMB(fused)']:.1%} of the LAMB step; the whole price of "
        f"whole-parameter norms (all-reduce, two passes over all shards instead of one per tensor): "
        f"{ms['LAMB(fused)'] / ms['LAMB(fused) local norms']:.2f}× LAMB on local norms (wrong ratios)"
    )
    if "DeepSpeedCPUAdam" in ms:
        print(
            f"LAMB(fused)/DeepSpeedCPUAdam on the same shards = {ms['LAMB(fused)'] / ms['DeepSpeedCPUAdam']:.2f} "
            f"(goal ≤ 1.3)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = bench.parser("optim", __doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads"
    )
    parser.add_argument(
        "--sharded", action="store_true", help="on the shards of --nproc processes (FSDP2's layout)"
    )
    parser.add_argument("--nproc", type=int, default=2, help="processes with --sharded (default 2)")
    args = parser.parse_args(argv)
    if args.sharded:
        result = run_workers(
            "largebatch.bench.optim", args.nproc, str(args.steps), str(args.warmup)
        )
        if result is None:
            return 1
        print_sharded(result, args.steps)
        return 0
    torch.set_num_threads(args.threads)

    shapes = resnet50_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"ResNet-50: {len(shapes)} tensors, {numel:,} values; {args.threads} threads, "
        f"median of {args.steps} steps after {args.warmup}"
    )
    optimizers = {name: make(_param_groups(seed=0)) for name, make in _candidates().items()}
    ms = time_steps(optimizers, args.steps, args.warmup)

    adamw, sgd = ms["torch AdamW(fused)"], ms["torch SGD(fused)"]
    print(f"{'optimizer':<24}{'ms/step':>9}{'/AdamW(fused)':>15}{'/SGD(fused)':>13}")
    for name, t in ms.items():
        print(f"{name:<24}{t:>9.2f}{t / adamw:>15.2f}{t / sgd:>13.2f}")
    print(f"LAMB(fused)/AdamW(fused) = {ms['LAMB(fused)'] / adamw:.2f} (goal ≤ 1.6)")
    print(f"LARS(fused)/SGD(fused) = {ms['LARS(fused)'] / sgd:.2f} (goal ≤ 1.5)")
    if "torch_optimizer.Lamb" in ms:
        print(
            f"torch_optimizer.Lamb/LAMB(fused) = {ms['torch_optimizer.Lamb'] / ms['LAMB(fused)']:.2f} (goal ≥ 3.5)"
        )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sharded_worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
