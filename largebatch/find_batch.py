"""`largebatch find-batch`: micro-batch size → peak memory, samples/s, fits or not; and the plan that keeps the
global batch.

Sizes grow 1, 2, 4, then multiples of 8 doubling (8, 16, 32, ...) up to the per-rank share of the
global batch, and stop at the first that passes the memory budget or raises a real out-of-memory
error. Memory is measured as in `largebatch.memory`: the allocator's peak on CUDA; on CPU a count of
parameters + gradients + optimizer state + the activations autograd saves for backward (training), or
parameters and buffers + the largest module input + output (inference: nothing is saved for backward).

A size fits if its peak leaves `--headroom` of the budget free (a run at 92 % of memory is one spike from an
out-of-memory error). The knee is the smallest fitting size within `--knee` of the best fitting samples/s: larger
ones buy little speed for their memory, so the recommended micro-batch is the smallest at or above the knee that
divides the per-rank share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from largebatch import batch, config, job, optim
from largebatch.engine import engine_class
from largebatch.errors import ArgumentParser, UserError
from largebatch.memory import ActivationMeter, parse_size, peak_bytes, state_bytes, training_state
from largebatch.precision import Precision
from largebatch.task import forward, logits_of, take, to_device


def sizes(limit: int) -> list[int]:
    out = [m for m in (1, 2, 4) if m <= limit]
    m = 8
    while m <= limit:
        out.append(m)
        m *= 2
    return out if out[-1] == limit else [*out, limit]


def _timed(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Seconds of one call: the fastest of `repeats` after a warm-up, since noise (other processes) only adds time."""

    def synced() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synced()  # warm-up: allocations, thread pools
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synced()
        times.append(time.perf_counter() - start)
    return min(times)


class _OutputMeter:
    """Peak of (input + output bytes) over leaf modules during a no-grad forward."""

    def __init__(self, model: nn.Module) -> None:
        self.peak = 0
        self._handles = [
            m.register_forward_hook(self._hook) for m in model.modules() if not list(m.children())
        ]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        self.peak = max(self.peak, sum(t.numel() * t.element_size() for t in tensors))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def measure(
    prepared: job.Job, micro: int, inference: bool, repeats: int, device: torch.device
) -> tuple[int, float]:
    """(peak bytes, samples/s) of one training step, or one forward pass, at micro-batch `micro`. Training: one
    process measures, and the state the configured engine does not keep on each rank of the plan's world (sharded
    parameters, gradients, optimizer state) is taken off the peak."""
    cfg, task = prepared.cfg, prepared.task
    torch.manual_seed(cfg.run.seed)
    model = task.build_model().to(device)
    optimizer = optim.build(model, cfg.optim, prepared.peak_lr)
    precision = Precision(cfg.train.precision, device)
    x, y = to_device(take(task.train, [i % len(task.train) for i in range(micro)]), device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if inference:
        model.eval()
        meter = _OutputMeter(model)

        def run() -> None:
            with torch.no_grad(), precision.autocast():
                forward(model, x)

        seconds = _timed(run, repeats, device)
        meter.close()
        peak = (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else state_bytes(model, gradients=False) + meter.peak
        )
    else:
        model.train()
        activations = ActivationMeter()

        def run() -> None:
            with activations.track(model), precision.autocast():
                total, count, _ = task.score(model, x, y)
                loss = total / count
            precision.backward(loss)
            norm = precision.unscale_and_clip(optimizer, list(model.parameters()), None)
            precision.step(optimizer, loss.item(), norm.item())
            optimizer.zero_grad(set_to_none=True)

        seconds = _timed(run, repeats, device)
        whole = training_state(model, optimizer)
        mine = engine_class(cfg.engine.name).per_rank(cfg, prepared.plan.world_size, whole)
        peak = peak_bytes(device, activations, model, optimizer) - whole.total + mine.total
    return peak, micro / seconds


def output_drift(
    prepared: job.Job, batch_sizes: list[int], device: torch.device, examples: int = 64
) -> float:
    """Max |difference| of eval-mode outputs on the same examples computed at each batch size vs one at a time."""
    cfg, task = prepared.cfg, prepared.task
    torch.manual_seed(cfg.run.seed)
    model = task.build_model().to(device).eval()
    held = task.eval if task.eval is not None and len(task.eval) else task.train
    n = min(examples, len(held))

    def outputs(size: int) -> torch.Tensor:
        chunks = [
            to_device(take(held, range(i, min(i + size, n))), device)[0] for i in range(0, n, size)
        ]
        return torch.cat([logits_of(forward(model, chunk)) for chunk in chunks])

    with torch.no_grad():
        reference = outputs(1)
        return max(float((outputs(b) - reference).abs().max()) for b in batch_sizes)


def _state_line(prepared: job.Job, device: torch.device) -> str:
    """Parameters, gradients and optimizer state per rank under the configured engine, against one process's."""
    cfg = prepared.cfg
    torch.manual_seed(cfg.run.seed)
    model = prepared.task.build_model().to(device)
    whole = training_state(model, optim.build(model, cfg.optim, prepared.peak_lr))
    mine = engine_class(cfg.engine.name).per_rank(cfg, prepared.plan.world_size, whole)
    return (
        f"per rank parameters {_mib(mine.params)}, gradients {_mib(mine.grads)}, optimizer state "
        f"{_mib(mine.optimizer)} ({mine.total / whole.total:.2f}× one process's {_mib(whole.total)})"
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


@dataclass(frozen=True)
class Row:
    """One line of the table: a micro-batch size, its peak bytes and samples/s (0 when not measured), its status."""

    micro: int
    peak: int
    rate: float
    status: str


def status(peak: int, budget: int | None, headroom: float) -> str:
    """'ok' if `peak` leaves the `headroom` fraction of `budget` free (always, with no budget)."""
    if budget is None or peak <= budget * (1 - headroom):
        return "ok"
    return "fits budget, not headroom" if peak <= budget else "over budget"


def knee(rates: dict[int, float], tolerance: float) -> int:
    """The smallest micro-batch whose samples/s is within `tolerance` (a fraction) of the best in `rates`."""
    best = max(rates.values())
    return min(m for m, rate in rates.items() if rate >= (1 - tolerance) * best)


def knee_line(rates: dict[int, float], tolerance: float) -> str:
    """The knee of the sizes that fit, and the best samples/s it is measured against."""
    bend, best = knee(rates, tolerance), max(rates, key=rates.__getitem__)
    if bend == best:
        return f"knee: micro {bend}, the fastest size that fits ({rates[bend]:.0f} samples/s)"
    return (
        f"knee: micro {bend}, the smallest size that fits within {_percent(tolerance)} of the best samples/s "
        f"({rates[bend]:.0f} vs {rates[best]:.0f} at micro {best})"
    )


def recommend(rates: dict[int, float], per_rank: int, tolerance: float) -> int:
    """The micro-batch to train with, from the samples/s of the sizes that fit: the smallest at or above the knee
    that divides the per-rank share (as fast within `tolerance`, with the most memory left), else the largest that
    divides it."""
    divisors = sorted(m for m in rates if per_rank % m == 0)
    return next((m for m in divisors if m >= knee(rates, tolerance)), divisors[-1])


def why(rates: dict[int, float], micro: int, per_rank: int, tolerance: float) -> str:
    """Why `recommend` chose `micro`, in a few words."""
    bend = knee(rates, tolerance)
    if micro == bend:
        return f"the knee: within {_percent(tolerance)} of the fastest that fits, with the most memory left"
    if micro > bend:
        return f"the smallest size at or above the knee ({bend}) that divides the per-rank share {per_rank}"
    return (
        f"the largest size that fits and divides the per-rank share {per_rank}; "
        f"none at or above the knee ({bend}) does"
    )


def accumulation_advice(
    measured: dict[int, float], fitting: set[int], micro: int, per_rank: int, tolerance: float
) -> str:
    """One line: does accumulating at `micro` cost less than it buys, against the fastest size measured (fitting or
    not, so a size over the budget shows what more memory would buy)?"""
    if micro == per_rank:
        return f"accumulation: not needed, the per-rank share of {per_rank} fits as one micro-batch"
    top = max(measured, key=measured.__getitem__)
    plan = f"accumulation {per_rank // micro} × micro {micro}"
    if top == micro:
        return f"{plan}: worth it, no size measured ran faster"
    ratio = measured[micro] / measured[top]
    head = f"{plan} runs at {ratio:.2f}× the samples/s of micro {top}" + (
        "" if top in fitting else ", which does not fit"
    )
    if ratio >= 1 - tolerance:
        return f"{head}: worth it, larger micro-batches buy only {1 / ratio - 1:.0%} more samples/s"
    if top not in fitting:
        return (
            f"{head}: it costs {1 - ratio:.0%} of samples/s; "
            f"free memory for micro {top} (train.precision=bf16) to win it back"
        )
    return (
        f"{head}: it costs {1 - ratio:.0%} of samples/s; "
        f"no faster size that fits divides the per-rank share {per_rank}"
    )


def advice(rows: list[Row], plan: batch.BatchPlan, tolerance: float) -> list[str]:
    """The knee, the recommended plan and the accumulation verdict for a measured table (at least one size fits)."""
    fitting = {row.micro: row.rate for row in rows if row.status == "ok"}
    micro = recommend(fitting, plan.per_rank, tolerance)
    chosen = batch.plan(plan.world_size, plan.global_batch, micro)
    measured = {row.micro: row.rate for row in rows if row.peak}
    return [
        knee_line(fitting, tolerance),
        f"recommend: batch.micro_size={micro} → {chosen.describe()} ({why(fitting, micro, plan.per_rank, tolerance)})",
        accumulation_advice(measured, set(fitting), micro, plan.per_rank, tolerance),
    ]


def _fraction(value: float, flag: str, meaning: str) -> float:
    """`value` if 0 <= value < 1, else a UserError saying so."""
    if not 0 <= value < 1:
        raise UserError(f"{flag}={value:g} must be at least 0 and below 1: {meaning}")
    return value


def _sweep(
    prepared: job.Job,
    inference: bool,
    repeats: int,
    device: torch.device,
    budget: int | None,
    headroom: float,
) -> list[Row]:
    """Measure the sizes in order, up to and including the first that does not fit."""
    rows = []
    for micro in sizes(prepared.plan.per_rank):
        try:
            peak, rate = measure(prepared, micro, inference, repeats, device)
        except torch.OutOfMemoryError:
            rows.append(Row(micro, 0, 0.0, "out of memory"))
            break
        except (
            ValueError
        ) as exc:  # e.g. BatchNorm on one example with a 1×1 feature map: try the next size
            rows.append(Row(micro, 0, 0.0, f"cannot train ({str(exc).splitlines()[0]})"))
            continue
        rows.append(Row(micro, peak, rate, status(peak, budget, headroom)))
        if rows[-1].status != "ok":
            break
    return rows


def _table(rows: list[Row], bend: int | None) -> list[str]:
    """The table's lines, the knee's row marked."""
    lines = [f"{'micro':>7} {'peak memory':>13} {'samples/s':>11}  status"]
    for row in rows:
        peak, rate = (_mib(row.peak), f"{row.rate:.0f}") if row.peak else ("-", "-")
        lines.append(
            f"{row.micro:>7} {peak:>13} {rate:>11}  {row.status}{'  ← knee' if row.micro == bend else ''}"
        )
    return lines


def _header(
    cfg: config.Config, device: torch.device, inference: bool, budget: int | None, headroom: float
) -> str:
    """What is measured, how memory is counted, and the budget with and without the headroom."""
    how = (
        "allocator peak"
        if device.type == "cuda"
        else (
            "parameters and buffers + largest module input/output (counted)"
            if inference
            else "parameters + gradients + optimizer state + saved activations (counted)"
        )
    )
    limit = (
        f"{_mib(budget)}, usable {_mib(budget * (1 - headroom))} after {_percent(headroom)} headroom"
        if budget
        else "none"
    )
    return (
        f"{'inference' if inference else 'training'}: {cfg.model.name} on {cfg.data.name}, {cfg.train.precision}, "
        f"{device.type}; memory = {how}; budget {limit}"
    )


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="largebatch find-batch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument(
        "--memory-limit",
        help="per-process budget, e.g. 8GiB (default: the GPU's memory; required on CPU to stop early)",
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=0.15,
        help="fraction of the budget to keep free for spikes (default 0.15)",
    )
    parser.add_argument(
        "--knee",
        type=float,
        default=0.05,
        help="the knee is the smallest size within this fraction of the best samples/s (default 0.05)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="processes the job will run on (for the recommended plan)",
    )
    parser.add_argument(
        "--inference",
        action="store_true",
        help="forward passes in eval mode, and check outputs do not depend on the batch size",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed repetitions per size after one warm-up; the fastest counts",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # section.key=value before or after the options
    headroom = _fraction(
        args.headroom, "--headroom", "the share of the budget kept free, e.g. --headroom 0.15"
    )
    tolerance = _fraction(
        args.knee, "--knee", "how far below the best samples/s the knee may be, e.g. --knee 0.05"
    )
    cfg = config.load(args.config, args.overrides)
    cfg.batch.micro_size = None if cfg.batch.micro_size == "auto" else cfg.batch.micro_size
    prepared = job.prepare(cfg, args.world_size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    budget = (
        parse_size(args.memory_limit, "--memory-limit")
        if args.memory_limit
        else (
            torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        )
    )
    plan = prepared.plan
    print(_header(cfg, device, args.inference, budget, headroom))
    if not args.inference:
        print(
            f"engine.name={cfg.engine.name} on {plan.world_size} process(es): {_state_line(prepared, device)}"
        )
    rows = _sweep(prepared, args.inference, args.repeats, device, budget, headroom)
    fitting = {row.micro: row.rate for row in rows if row.status == "ok"}
    bend = knee(fitting, tolerance) if fitting else None
    print("\n".join(_table(rows, bend)))
    if not fitting:
        print(
            "nothing fits: lower the model size, use model.grad_checkpointing or train.precision=bf16"
        )
        return 0
    if args.inference:
        print(knee_line(fitting, tolerance))
        print(
            f"max |output difference| across batch sizes {list(fitting)} vs one example at a time: "
            f"{output_drift(prepared, list(fitting), device):.3g}"
        )
        print(f"recommend: evaluate with batch size {list(fitting)[-1]}")
        return 0
    print("\n".join(advice(rows, plan, tolerance)))
    return 0
