"""Time one optimizer step over ResNet-50's parameter shapes for our LARS/LAMB and the baselines.

Each ratio is printed as the median and quartiles of its per-round ratios (the optimizers take turns, one step each per
round). The rows "LAMB(fused) first pass" and "LARS(fused) first pass" run the fused kernels' first pass alone (LAMB's
moments and norms, LARS's norms): the same kernel doing less work, the floor a second pass read wholly from cache would
approach. `--cpu-time` (with `--threads 1`) times each step by the thread's CPU time: steadier on a loaded machine,
where wall time also counts the waits for a core.

`--sharded` times them on the shards of 2 processes instead (torchrun, gloo): our LAMB and LARS on DTensors sharded
on dim 0 as FSDP2 shards them (whole-parameter norms from one all-reduce per step) against torch's fused AdamW and SGD,
DeepSpeed's CPU Adam (the optimizer of ZeRO-Offload) and our LAMB with per-shard norms (wrong; the cost floor),
stepping the same local shards as plain tensors.

`--muon` times our Muon against torch.optim.Muon instead, on the weight matrices of the built-in GPT's blocks at
width 32 (a tiny GPT's many small ones) and 128, and of two GPT-2-small blocks, with the Newton–Schulz iteration in
bf16 (torch's) and in fp32 (torch's patched), the same threads for both: per-step medians, the speed-up's median and
quartiles over the rounds, and the step against its Newton–Schulz FLOPs at this machine's measured matmul rate.
`--muon --sharded`: our Muon's step per rank on the matrices sharded on dim 0 over --nproc processes (1 thread each;
FSDP2's layout, and split over DDP replicas) against the unsharded step on 1 thread.

`--device cuda` times the steps on a GPU instead: LARS, LAMB and Muon against torch's fused
optimizers on ResNet-50's and GPT-2 small's shapes.
"""

import json
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from largebatch import bench
from largebatch.bench import run_workers
from largebatch.errors import UserError
from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS
from largebatch.optim.muon import NS_DTYPES, Muon
from largebatch.optim.newton_schulz import ns_flops

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


def _param_groups(
    seed: int,
    shapes: list[tuple[int, ...]] | None = None,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Parameters of `shapes` (ResNet-50's by default) on `device` with random gradients; 1-D tensors neither decay
    nor adapt."""
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for shape in shapes or resnet50_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device) * 0.05)
        p.grad = torch.randn(shape, generator=gen, device=device) * 1e-3
        params.append(p)
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": 1e-4},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "adapt": False},
    ]


class _FirstPass:
    """Stands in for an optimizer in `step_times`: the first pass of our LARS/LAMB alone (no update of the weights)."""

    def __init__(self, optimizer: LAMB | LARS) -> None:
        self.optimizer = optimizer

    @torch.no_grad()
    def step(self) -> None:
        for group in self.optimizer.param_groups:
            self.optimizer._first_pass(group, [p for p in group["params"] if p.grad is not None])


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
        "LARS(fused) first pass": lambda g: _FirstPass(LARS(g, lr=0.1, impl="fused")),
        "LAMB(fused) first pass": lambda g: _FirstPass(LAMB(g, lr=1e-3, impl="fused")),
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


def step_times(
    optimizers: dict[str, Optimizer],
    steps: int,
    warmup: int,
    before: Callable[[], object] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time of each round's step() per optimizer by `clock` (wall time unless given), in milliseconds, after `warmup`
    untimed steps each; `before` runs untimed before every step (a barrier, so that a collective step does not time the
    wait for a slower rank's previous one).

    The optimizers take turns, one step each per round, so that load from other processes hits all of them alike, and
    each step starts with caches full of another model's state, as it does after a backward pass.
    """
    for optimizer in optimizers.values():
        for _ in range(warmup):
            before()
            optimizer.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(steps):
        for name, optimizer in optimizers.items():
            before()
            start = clock()
            optimizer.step()
            times[name].append(1e3 * (clock() - start))
    return times


def _ratio_quartiles(
    times: dict[str, list[float]], name: str, base: str
) -> tuple[float, float, float]:
    """The median and quartiles of the per-round ratios of `name`'s step time to `base`'s."""
    ratios = [t / b for t, b in zip(times[name], times[base])]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return median, q1, q3


def _ratio_line(times: dict[str, list[float]], name: str, base: str, goal: str = "") -> str:
    median, q1, q3 = _ratio_quartiles(times, name, base)
    return (
        f"{name}/{base} = {median:.2f} (quartiles {q1:.2f}-{q3:.2f}){f' ({goal})' if goal else ''}"
    )


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
    times = step_times({**optimizers, "all-reduce": _AllReduce(sums)}, steps, warmup)
    largest = torch.tensor(list(times.values()))
    dist.all_reduce(largest, dist.ReduceOp.MAX)
    lbdist.teardown()
    if info.is_main:
        print(
            json.dumps(
                {
                    "times": dict(zip(times, largest.tolist())),
                    "adapted": adapted,
                    "world": info.world_size,
                }
            )
        )


class _AllReduce:
    """Stands in for an optimizer in `step_times`: the all-reduce of LAMB's per-parameter sums alone."""

    def __init__(self, sums: torch.Tensor) -> None:
        self.sums = sums

    def step(self) -> None:
        dist.all_reduce(self.sums)


def print_sharded(result: dict, steps: int) -> None:
    times, world = result["times"], result["world"]
    ms = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"ResNet-50's shapes sharded on dim 0 over {world} processes (1 thread each), the median of {steps} steps "
        f"timed on the slower rank of each; our LARS/LAMB on DTensors, the others on the same local shards"
    )
    adamw = ms["torch AdamW(fused)"]
    print(f"{'optimizer':<24}{'ms/step':>9}{'/AdamW(fused)':>15}")
    for name, t in ms.items():
        print(f"{name:<24}{t:>9.2f}{t / adamw:>15.2f}")
    print(_ratio_line(times, "LAMB(fused)", "torch AdamW(fused)", "goal ≤ 1.6") + " on the shards")
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


GPTS = {
    "tiny GPT, width 32, 8 blocks": (32, 8),
    "GPT, width 128, 6 blocks": (128, 6),
    "GPT-2 small, 2 blocks": (768, 2),
}
"""Muon's workloads: (width, blocks) of the built-in GPT's blocks whose weight matrices Muon steps."""
MUON_GOALS = {"tiny GPT, width 32, 8 blocks": 1.5, "GPT-2 small, 2 blocks": 1.0}
"""Speed-up over torch.optim.Muon that the bf16 rows should reach (issue 26)."""


def gpt_matrix_shapes(width: int, blocks: int) -> list[tuple[int, int]]:
    """The weight matrices of `blocks` blocks of the built-in GPT, (out, in) as nn.Linear stores them: qkv, the
    attention's projection, the MLP's two."""
    return [(3 * width, width), (width, width), (4 * width, width), (width, 4 * width)] * blocks


def _matrices(
    shapes: list[tuple[int, int]], shard: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> list[torch.nn.Parameter]:
    """Weights and random gradients of `shapes` (the same values on every rank), each through `shard`."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(shard(torch.randn(shape, generator=gen) * 0.02))
        p.grad = shard(torch.randn(shape, generator=gen) * 1e-3)
        params.append(p)
    return params


def _fp32_zeropower(
    grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """torch's `_zeropower_via_newtonschulz` with the iteration in fp32 (torch hard-codes bf16)."""
    a, b, c = coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _torch_muon(params: list[torch.nn.Parameter], ns_dtype: str) -> Optimizer:
    """torch.optim.Muon at our bench settings, its Newton–Schulz in `ns_dtype`."""
    optimizer = torch.optim.Muon(params, lr=0.02, weight_decay=0.1)
    if ns_dtype == "fp32":
        step = optimizer.step

        def fp32_step(closure: Callable | None = None) -> object:
            with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", _fp32_zeropower):
                return step(closure)

        optimizer.step = fp32_step
    return optimizer


def matmul_rate(dtype: torch.dtype, n: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` (n × n) @ (n × n) matmuls in `dtype` (the fastest: other processes on the
    machine slow some down)."""
    a, b = (torch.randn(n, n).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def muon_rows(steps: int, warmup: int, threads: int) -> None:
    """Print our Muon against torch.optim.Muon on each of GPTS, in bf16 and fp32 (see the module)."""
    has_torch = hasattr(torch.optim, "Muon")
    if not has_torch:
        print("torch.optim.Muon: not available (torch < 2.9); our rows only")
    rates = {name: matmul_rate(dtype) for name, dtype in NS_DTYPES.items()}
    print(
        f"Muon on weight matrices, {threads} threads, median of {steps} steps after {warmup}; "
        f"matmul rate (1024² @ 1024²): "
        + ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in rates.items())
    )
    print(
        f"{'matrices':<32}{'NS':>5}{'ours ms':>9}{'torch ms':>10}{'torch/ours':>11}{'quartiles':>13}"
        f"{'NS GFLOP':>10}{'floor ms':>10}{'ours/floor':>11}"
    )
    speedups = {}
    for label, (width, blocks) in GPTS.items():
        shapes = gpt_matrix_shapes(width, blocks)
        flops = sum(ns_flops(rows, cols, 5) for rows, cols in shapes)
        for ns_dtype in NS_DTYPES:
            optimizers = {"ours": Muon(_matrices(shapes), lr=0.02, ns_dtype=ns_dtype)}
            if has_torch:
                optimizers["torch"] = _torch_muon(_matrices(shapes), ns_dtype)
            times = step_times(optimizers, steps, warmup)
            ours, floor = statistics.median(times["ours"]), 1e3 * flops / rates[ns_dtype]
            row = f"{label:<32}{ns_dtype:>5}{ours:>9.2f}"
            if has_torch:
                ratios = [t / o for t, o in zip(times["torch"], times["ours"])]
                q1, median, q3 = statistics.quantiles(ratios, n=4)
                speedups[label, ns_dtype] = median
                row += f"{statistics.median(times['torch']):>10.2f}{median:>11.2f}{f'{q1:.2f}-{q3:.2f}':>13}"
            else:
                row += f"{'':>34}"
            print(row + f"{flops / 1e9:>10.4g}{floor:>10.2f}{ours / floor:>11.2f}")
    for label, goal in MUON_GOALS.items():
        if (label, "bf16") in speedups:
            print(
                f"torch.optim.Muon/ours on the {label} matrices, bf16 = {speedups[label, 'bf16']:.2f} "
                f"(goal ≥ {goal})"
            )
    print(
        "floor: the Newton–Schulz FLOPs (5 iterations of 2·(2m²n + m³) for an m × n matrix, m ≤ n) at the "
        "1024² matmul rate"
    )


def muon_sharded_worker(steps: int, warmup: int) -> None:
    """Runs under torchrun: our Muon (bf16) on GPTS unsharded, on FSDP2's dim-0 shards (DTensors) and split over the
    ranks as DDP replicas; rank 0 prints the largest medians over ranks (a barrier before every step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from largebatch import dist as lbdist

    info = lbdist.from_env()
    lbdist.init(info, always=True)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (info.world_size,))
    dtensor = lambda t: distribute_tensor(t, mesh, [Shard(0)])  # noqa: E731
    result = {}
    for label, (width, blocks) in GPTS.items():
        shapes = gpt_matrix_shapes(width, blocks)
        optimizers = {
            "unsharded": Muon(_matrices(shapes), lr=0.02),
            "FSDP2 shards": Muon(_matrices(shapes, dtensor), lr=0.02),
            "DDP split": Muon(_matrices(shapes), lr=0.02, replicated=dist.group.WORLD),
        }
        times = step_times(optimizers, steps, warmup, before=dist.barrier)
        largest = torch.tensor([statistics.median(t) for t in times.values()])
        dist.all_reduce(largest, dist.ReduceOp.MAX)
        result[label] = dict(zip(times, largest.tolist()))
    lbdist.teardown()
    if info.is_main:
        print(json.dumps({"ms": result, "world": info.world_size}))


def print_muon_sharded(result: dict, steps: int) -> None:
    print(
        f"Muon (bf16 Newton–Schulz) over {result['world']} processes (1 thread each), the slowest rank's median of "
        f"{steps} steps: unsharded (every rank all matrices), on FSDP2's dim-0 shards (DTensors, 2 all-to-alls), "
        f"split over DDP replicas (1 all-gather)"
    )
    print(
        f"{'matrices':<32}{'unsharded':>11}{'FSDP2 shards':>14}{'/unsharded':>12}{'DDP split':>11}"
        f"{'/unsharded':>12}"
    )
    for label, ms in result["ms"].items():
        base, fsdp, ddp = ms["unsharded"], ms["FSDP2 shards"], ms["DDP split"]
        print(
            f"{label:<32}{base:>11.2f}{fsdp:>14.2f}{fsdp / base:>12.2f}{ddp:>11.2f}{ddp / base:>12.2f}"
        )
    print("goal: FSDP2 shards/unsharded ≤ 0.6 on 2 processes")


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
    parser.add_argument(
        "--muon",
        action="store_true",
        help="our Muon vs torch.optim.Muon on GPT matrices instead (try --steps 10 --warmup 2)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps by the thread's CPU time (needs --threads 1): steadier on a loaded machine",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: LARS, LAMB and Muon on a GPU against torch's fused optimizers, on ResNet-50's and GPT-2 "
        "small's shapes (its own rows)",
    )
    args = parser.parse_args(argv)
    if args.cpu_time and (args.threads != 1 or args.sharded or args.muon):
        raise UserError(
            "--cpu-time times one thread: give it with --threads 1, without --sharded or --muon"
        )
    if args.device == "cuda":
        from largebatch.bench import _optim_cuda as optim_cuda

        if args.sharded or args.muon or args.cpu_time:
            raise UserError(
                "--device cuda prints its own rows (Muon's among them): give it without --sharded, --muon "
                "or --cpu-time"
            )
        bench.cuda_devices()
        optim_cuda.rows(torch.device("cuda"), args.steps, args.warmup)
        return 0
    if args.sharded:
        result = run_workers(
            "largebatch.bench.optim",
            args.nproc,
            str(args.steps),
            str(args.warmup),
            *(["muon"] if args.muon else []),
        )
        if result is None:
            return 1
        (print_muon_sharded if args.muon else print_sharded)(result, args.steps)
        return 0
    torch.set_num_threads(args.threads)
    if args.muon:
        muon_rows(args.steps, args.warmup, args.threads)
        return 0

    shapes = resnet50_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"ResNet-50: {len(shapes)} tensors, {numel:,} values; {args.threads} threads, "
        f"median of {args.steps} steps after {args.warmup}"
    )
    optimizers = {name: make(_param_groups(seed=0)) for name, make in _candidates().items()}
    clock = time.thread_time if args.cpu_time else time.perf_counter
    times = step_times(optimizers, args.steps, args.warmup, clock=clock)
    ms = {name: statistics.median(t) for name, t in times.items()}

    adamw, sgd = ms["torch AdamW(fused)"], ms["torch SGD(fused)"]
    print(f"{'optimizer':<24}{'ms/step':>9}{'/AdamW(fused)':>15}{'/SGD(fused)':>13}")
    for name, t in ms.items():
        print(f"{name:<24}{t:>9.2f}{t / adamw:>15.2f}{t / sgd:>13.2f}")
    print(_ratio_line(times, "LAMB(fused)", "torch AdamW(fused)", "goal ≤ 1.15"))
    print(
        _ratio_line(
            times, "LAMB(fused) first pass", "torch AdamW(fused)", "the floor's lower bound"
        )
    )
    print(_ratio_line(times, "LARS(fused)", "torch SGD(fused)", "goal ≤ 1.2"))
    print(
        _ratio_line(times, "LARS(fused) first pass", "torch SGD(fused)", "the floor's lower bound")
    )
    if "torch_optimizer.Lamb" in ms:
        print(_ratio_line(times, "torch_optimizer.Lamb", "LAMB(fused)", "goal ≥ 3.5"))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker = muon_sharded_worker if sys.argv[4:5] == ["muon"] else sharded_worker
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
