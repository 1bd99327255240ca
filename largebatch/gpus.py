"""`largebatch plan --gpus 8,64,512`: how many GPUs a job is worth.

Steps to the target at global batch B (McCandlish et al. 2018, eq. 2.11):  S(B) = S_min (1 + B_crit / B).
One step on G GPUs:  compute of B/G examples per GPU at the rate measured here (or `--step-time`), then the
gradient all-reduce of the model's gradient bytes by the α–β ring model of `largebatch.network` (hierarchical inside
and across nodes, one all-reduce per DDP bucket), once per step: with accumulation only the last micro-step
communicates. No overlap of the all-reduce with backward is assumed, so the step time is an upper bound where DDP
overlaps it. Time-to-target = S(B) × step time; GPU-hours = G × time-to-target.
Two views: the config's global batch fixed (more GPUs split it thinner), and the per-GPU batch fixed (the global
batch grows with G, so steps fall towards S_min while communication grows).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from largebatch import config, network
from largebatch.errors import UserError


@dataclass(frozen=True)
class Row:
    """One GPU count's prediction; `steps`, `time_s` and `gpu_hours` are in units of S_min steps when S_min is
    unknown (then only their ratios mean anything)."""

    gpus: int
    global_batch: int
    accum_steps: int
    compute_s: float
    comm_s: float
    step_s: float
    comm_share: float
    efficiency: float
    """Time-to-target speed-up over one GPU (same view) ÷ G: the compute share × the examples-efficiency of the
    larger batch, (b + B_crit) / (G·b + B_crit), in the per-GPU view."""
    steps: float
    time_s: float
    gpu_hours: float


def steps_to_target(batch: float, b_crit: float, s_min: float) -> float:
    """S(B) = S_min (1 + B_crit / B)."""
    return s_min * (1 + b_crit / batch)


def table(
    gpus: Sequence[int],
    *,
    grad_bytes: float,
    example_s: float,
    micro_batch: int,
    b_crit: float,
    net: network.Network,
    global_batch: int | None = None,
    per_gpu_batch: int | None = None,
    s_min: float = 1.0,
) -> list[Row]:
    """The planner's rows, for a fixed `global_batch` or a fixed `per_gpu_batch` (exactly one); GPU counts that
    would get less than one example each are left out."""
    if (global_batch is None) == (per_gpu_batch is None):
        raise ValueError("give exactly one of global_batch and per_gpu_batch")
    rows = []
    for g in gpus:
        batch = global_batch if global_batch is not None else per_gpu_batch * g
        one_gpu_batch = global_batch if global_batch is not None else per_gpu_batch
        if batch < g:
            continue
        compute = batch / g * example_s
        comm = net.gradient_all_reduce(grad_bytes, g)
        step = compute + comm
        steps = steps_to_target(batch, b_crit, s_min)
        time_s = steps * step
        one_gpu_time = steps_to_target(one_gpu_batch, b_crit, s_min) * one_gpu_batch * example_s
        rows.append(
            Row(
                gpus=g,
                global_batch=batch,
                accum_steps=math.ceil(batch / g / micro_batch),
                compute_s=compute,
                comm_s=comm,
                step_s=step,
                comm_share=comm / step,
                efficiency=one_gpu_time / (g * time_s),
                steps=steps,
                time_s=time_s,
                gpu_hours=g * time_s / 3600,
            )
        )
    return rows


def choose(rows: list[Row], slack: float = 0.10) -> tuple[Row, Row]:
    """The row with the least time-to-target, and the row with the fewest GPU-hours within `slack` of it."""
    fastest = min(rows, key=lambda r: r.time_s)
    frugal = min(
        (r for r in rows if r.time_s <= (1 + slack) * fastest.time_s), key=lambda r: r.gpu_hours
    )
    return fastest, frugal


def parse_gpus(text: str) -> list[int]:
    """'8,64,512' → [8, 64, 512]: positive integers."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(
            f"--gpus={text!r} must be positive GPU counts separated by commas, e.g. --gpus 8,64,512"
        )
    return sorted(set(counts))


def parse_steps_at(text: str) -> tuple[float, float]:
    """'4096:12000' → (batch 4096, 12000 steps to the target at that batch)."""
    try:
        batch, steps = (float(part) for part in text.split(":"))
    except ValueError:
        batch = steps = 0.0
    if batch <= 0 or steps <= 0:
        raise UserError(
            f"--steps-at={text!r} must be BATCH:STEPS, the steps a run takes to the target at that global batch, "
            f"e.g. --steps-at 4096:12000"
        )
    return batch, steps


def critical_batch(source: str) -> tuple[float, float | None, str]:
    """(B_crit, S_min or None, where from) of `--bcrit`: a number; a sweep directory or its sweep.json (the fit's
    B_crit and S_min); a `noise-scale --json` file (B_simple, McCandlish's estimate of B_crit); or a cbs.jsonl (the
    last line's critical_batch)."""
    try:
        value = float(source)
    except ValueError:
        value = None
    if value is not None:
        if value <= 0 or not math.isfinite(value):
            raise UserError(f"--bcrit={source} must be a positive batch size, e.g. --bcrit 2048")
        return value, None, "--bcrit"
    path = Path(source)
    if path.is_dir():
        path = path / "sweep.json"
    if not path.is_file():
        raise UserError(
            f"--bcrit {source}: no such file; give a number, a sweep directory (sweep.json), a noise-scale --json "
            f"file or a cbs.jsonl"
        )
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            found = [line["critical_batch"] for line in lines if line.get("critical_batch")]
            return float(found[-1]), None, f"critical_batch, last line of {path}"
        data = json.loads(path.read_text())
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        data = None
    if isinstance(data, dict) and data.get("fit"):
        fit = data["fit"]
        return float(fit["b_crit"]), float(fit["s_min"]), f"sweep fit in {path}"
    if isinstance(data, dict) and data.get("b_simple"):
        return float(data["b_simple"]), None, f"noise scale B_simple in {path} (taken as B_crit)"
    raise UserError(
        f"--bcrit {source} holds no critical batch: expected a sweep.json with a fit, a noise-scale --json file "
        f"(b_simple) or cbs.jsonl lines with critical_batch"
    )


DEFAULTS = {"latency": "10us", "bandwidth": "100Gb/s", "intra_bandwidth": "2400Gb/s"}
"""The network without flags: 10 µs per message, 100 Gb/s per node, 300 GB/s (2400 Gb/s) between GPUs of a node."""


def network_of(args: argparse.Namespace) -> tuple[network.Network, str]:
    """The network model from the flags (a `--network` fit sets latency and both bandwidths unless given)."""
    latency = network.parse_latency(args.latency, "--latency") if args.latency else None
    bandwidth = network.parse_bandwidth(args.bandwidth, "--bandwidth") if args.bandwidth else None
    intra = (
        network.parse_bandwidth(args.intra_bandwidth, "--intra-bandwidth")
        if args.intra_bandwidth
        else None
    )
    if args.gpus_per_node < 1:
        raise UserError(f"--gpus-per-node={args.gpus_per_node} must be 1 or more")
    where = "flags and defaults"
    if args.network:
        fit_latency, fit_bandwidth = network.load(args.network)
        latency = fit_latency if latency is None else latency
        bandwidth = fit_bandwidth if bandwidth is None else bandwidth
        intra = fit_bandwidth if intra is None else intra
        where = f"{args.network} where no flag is given"
    latency = (
        network.parse_latency(DEFAULTS["latency"], "--latency") if latency is None else latency
    )
    bandwidth = (
        network.parse_bandwidth(DEFAULTS["bandwidth"], "--bandwidth")
        if bandwidth is None
        else bandwidth
    )
    intra = (
        network.parse_bandwidth(DEFAULTS["intra_bandwidth"], "--intra-bandwidth")
        if intra is None
        else intra
    )
    return network.Network(latency, bandwidth, intra, args.gpus_per_node), where


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`plan`'s --gpus options."""
    parser.add_argument(
        "--gpus",
        help="GPU counts to compare, e.g. 8,64,512: predicted step time, steps and time-to-target for each "
        "(the config's batch plan is taken on the fewest)",
    )
    parser.add_argument(
        "--bandwidth",
        help=f"each node's network bandwidth (default {DEFAULTS['bandwidth']}; Gb/s bits, GB/s bytes)",
    )
    parser.add_argument("--latency", help=f"latency per message (default {DEFAULTS['latency']})")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument(
        "--intra-bandwidth",
        help=f"bandwidth between GPUs of one node (default {DEFAULTS['intra_bandwidth']})",
    )
    parser.add_argument(
        "--step-time",
        type=float,
        help="seconds of compute of one micro-step (batch.micro_size examples) on one GPU "
        "(default: measured here, as find-batch does)",
    )
    parser.add_argument(
        "--bcrit",
        help="critical batch: a number, a sweep directory, a noise-scale --json file or a cbs.jsonl",
    )
    parser.add_argument(
        "--steps-at",
        help="BATCH:STEPS, the steps to the target at that global batch; sets S_min (else times are relative)",
    )
    parser.add_argument("--network", help="a network fit from largebatch bench comm --out FILE")


def gradient_bytes_and_rate(
    cfg: config.Config, world_size: int, micro: int, step_time: float | None
) -> tuple[int, float, str]:
    """(gradient bytes, seconds of compute per example on one GPU, how that was found). With `step_time` the
    model is built on the meta device (shapes only); without, one training step at `micro` examples is timed here
    as `find-batch` times it."""
    import torch

    from largebatch import find_batch, job
    from largebatch import task as tasks

    if step_time is not None:
        task = tasks.build(cfg)
        with torch.device("meta"):
            model = task.build_model()
        how = f"--step-time {step_time:g} s per micro-step of {micro}"
        example_s = step_time / micro
    else:
        cfg.train.noise_scale = (
            False  # timing one step measures no noise scale; it would refuse a world of 1
        )
        prepared = job.prepare(cfg, world_size)
        model = prepared.model
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        _, rate = find_batch.measure(prepared, micro, False, 3, device)
        how = (
            f"measured here: {rate:.1f} examples/s at micro-batch {micro} on {device.type} "
            f"with {torch.get_num_threads()} thread(s), fastest of 3 steps"
        )
        example_s = 1 / rate
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return grads, example_s, how


def _si(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1), ("ms", 1e-3)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1e6:.3g} µs"


def _lines(rows: list[Row], known: bool) -> list[str]:
    """The table, time-to-target and GPU-hours relative to the fastest row when S_min is unknown."""
    fastest, frugal = choose(rows)
    time_head, hours_head = (
        ("time-to-target", "GPU-hours") if known else ("rel. time", "rel. GPU-h")
    )
    out = [
        f"{'GPUs':>6} {'global':>8} {'accum':>5} {'step':>9} {'comm':>6} {'effic.':>6} "
        f"{'steps' if known else 'S/S_min':>9} {time_head:>14} {hours_head:>10}"
    ]
    for r in rows:
        time_s = _si(r.time_s) if known else f"{r.time_s / fastest.time_s:.3f}"
        hours = f"{r.gpu_hours:.4g}" if known else f"{r.gpu_hours / fastest.gpu_hours:.3f}"
        mark = "  ← fastest" if r is fastest else ""
        mark += (
            ("  ← " if not mark else ", ") + "fewest GPU-hours within 10 %" if r is frugal else ""
        )
        out.append(
            f"{r.gpus:>6} {r.global_batch:>8} {r.accum_steps:>5} {_si(r.step_s):>9} {r.comm_share:>6.1%} "
            f"{r.efficiency:>6.1%} {r.steps:>9.{0 if known else 3}f} {time_s:>14} {hours:>10}{mark}"
        )
    return out


def main(cfg: config.Config, args: argparse.Namespace) -> int:
    """Check every flag, then measure (or take) the step time, and print both views with their answers."""
    from largebatch import batch, batch_schedule

    gpus = parse_gpus(args.gpus)
    if args.world_size != 1 or args.nproc_per_node is not None:
        raise UserError(
            "--world-size and --nproc-per-node do not apply with --gpus, which plans each GPU count it lists "
            f"({args.gpus}) with --gpus-per-node per node; drop them, or drop --gpus to plan one topology"
        )
    if args.bcrit is None:
        raise UserError(
            "--gpus needs the critical batch: --bcrit B, a sweep directory, a noise-scale --json file or a cbs.jsonl"
        )
    b_crit, s_min, b_from = critical_batch(args.bcrit)
    s_from = "the sweep's fit" if s_min is not None else None
    if args.steps_at:
        at_batch, at_steps = parse_steps_at(args.steps_at)
        s_min, s_from = at_steps / (1 + b_crit / at_batch), f"--steps-at {args.steps_at}"
    net, net_from = network_of(args)
    if args.step_time is not None and not (args.step_time > 0 and math.isfinite(args.step_time)):
        raise UserError(
            f"--step-time={args.step_time} must be positive seconds, e.g. --step-time 0.25"
        )
    fewest = gpus[0]
    try:
        plan = batch.plan(
            fewest,
            cfg.batch.global_size,
            batch_schedule.micro_size(cfg.batch, fewest),
            cfg.batch.accum_steps,
        )
    except UserError as exc:
        raise UserError(
            f"the config's batch plan on the fewest --gpus count, {fewest}: {exc}"
        ) from None
    grads, example_s, how = gradient_bytes_and_rate(cfg, fewest, plan.micro_batch, args.step_time)
    common = dict(
        grad_bytes=grads,
        example_s=example_s,
        micro_batch=plan.micro_batch,
        b_crit=b_crit,
        net=net,
        s_min=s_min or 1.0,
    )
    views = {
        f"global batch fixed at {plan.global_batch} (the config's)": table(
            gpus, global_batch=plan.global_batch, **common
        ),
        f"per-GPU batch fixed at {plan.per_rank} (the config's share on {fewest} GPU{'s' * (fewest > 1)}; "
        f"the global batch grows with the GPUs)": table(
            gpus, per_gpu_batch=plan.per_rank, **common
        ),
    }
    print(
        f"model: {grads / 1e6:.4g} MB of gradients, micro-batch {plan.micro_batch}; compute {how}"
    )
    print(
        f"critical batch B_crit {b_crit:.4g} ({b_from}); "
        + (f"S_min {s_min:.4g} steps ({s_from})" if s_min else "S_min unknown: times are relative")
    )
    print(
        f"network ({net_from}): latency {net.latency * 1e6:.3g} µs per message, {net.bandwidth / 1e9:.4g} GB/s "
        f"per node, {net.intra_bandwidth / 1e9:.4g} GB/s inside a node of {net.gpus_per_node} GPUs"
    )
    for title, rows in views.items():
        print(f"\n{title}:")
        if not rows:
            print("  no GPU count gets one example each; use fewer GPUs")
            continue
        print("\n".join(_lines(rows, s_min is not None)))
        skipped = [g for g in gpus if g not in {r.gpus for r in rows}]
        if skipped:
            print(f"  left out: {skipped} GPUs get less than one example each")
        fastest, frugal = choose(rows)
        print(
            f"answer: {fastest.gpus} GPUs reach the target fastest; {frugal.gpus} GPUs within 10 % of that "
            f"at the fewest GPU-hours"
        )
    print(
        "\nassumptions: S(B) = S_min(1 + B_crit/B) (McCandlish et al. 2018); compute scales perfectly "
        "(per-example time fixed, whatever the per-GPU batch); one hierarchical ring all-reduce of all "
        "gradients per step, per DDP bucket (1 MiB, then 25 MiB), after the last micro-step, NOT overlapped with "
        "backward (an upper bound); no stragglers, congestion or topology beyond node/network; engine ddp's "
        "traffic (FSDP and ZeRO-3 also all-gather parameters: not counted); efficiency = speed-up over 1 GPU ÷ GPUs"
    )
    return 0


def refuse_without_gpus(args: argparse.Namespace) -> None:
    """The --gpus options mean nothing without --gpus: say so rather than ignore them."""
    given = [
        f"--{name.replace('_', '-')}"
        for name in (
            "bandwidth",
            "latency",
            "intra_bandwidth",
            "step_time",
            "bcrit",
            "steps_at",
            "network",
        )
        if getattr(args, name) is not None
    ]
    if given or args.gpus_per_node != 8:
        raise UserError(
            f"{', '.join(given) or '--gpus-per-node'} only apply with --gpus, e.g. --gpus 8,64,512"
        )
