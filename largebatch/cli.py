"""`largebatch <command>`: argparse front end; user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from largebatch import config
from largebatch.errors import ArgumentParser, TrainingStopped, UserError, warn


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="YAML config file (defaults apply to anything it leaves out)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config keys, e.g. optim.lr=0.2",
    )


def _train(args: argparse.Namespace) -> int:
    from largebatch import api

    cfg = config.load(args.config, args.overrides)
    summary = api.run(cfg)
    if os.environ.get("RANK", "0") == "0":
        parts = [
            f"{summary['steps']} steps",
            f"final loss {summary['final_loss']:.4f}",
            *(f"held-out {k} {v:.4f}" for k, v in summary["eval"].items() if k == "accuracy"),
            f"{summary['samples_per_s']:.0f} samples/s",
            *([f"{summary['tokens_per_s']:.0f} tokens/s"] if "tokens_per_s" in summary else []),
            *([f"MFU {summary['mfu']:.1%}"] if summary.get("mfu") is not None else []),
        ]
        print(f"done: {', '.join(parts)}; run dir {cfg.run_dir}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, args.overrides)
    from largebatch import dist, gpus, job

    if args.gpus is not None:
        return gpus.main(cfg, args)
    gpus.refuse_without_gpus(args)

    local = args.world_size if args.nproc_per_node is None else args.nproc_per_node
    if args.nproc_per_node is not None and (local < 1 or args.world_size % local):
        raise UserError(
            f"--nproc-per-node={local} must be a positive divisor of --world-size={args.world_size} "
            f"(the processes on each node)"
        )
    prepared = job.prepare(cfg, args.world_size, train_examples=args.examples)
    prepared.threads = dist.threads(cfg.run.threads, local_processes=local)
    if (
        cfg.run.threads is None
        and not os.environ.get("OMP_NUM_THREADS")
        and prepared.threads > 1
        and local > 1
    ):
        warn(
            f"plain torchrun sets OMP_NUM_THREADS=1 for 2+ processes per node, so each would run 1 thread, "
            f"not {prepared.threads}; launch/torchrun.sh exports {prepared.threads} (or set run.threads)"
        )
    for key, value in prepared.derived().items():
        print(f"{key:16} {value}")
    return 0


def _build(args: argparse.Namespace) -> int:
    """Build (or find) every extension a run on this machine may use, and say where each is or why there is none."""
    from largebatch.engine import deepspeed
    from largebatch.optim import fused

    for what, where in (fused.build_ahead(), deepspeed.build_ahead()):
        print(f"{what}: {where}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from largebatch import bench

    return bench.run(args.what, args.rest)


def _report(argv: list[str]) -> int:
    from largebatch import report

    return report.main(argv)


def _find_batch(argv: list[str]) -> int:
    from largebatch import find_batch

    return find_batch.main(argv)


def _noise_scale(argv: list[str]) -> int:
    from largebatch import noise_probe

    return noise_probe.main(argv)


def _cbs(argv: list[str]) -> int:
    from largebatch import cbs

    return cbs.main(argv)


def _sweep(argv: list[str]) -> int:
    from largebatch import sweep

    return sweep.main(argv)


SUBPROGRAMS = {
    "cbs": _cbs,
    "find-batch": _find_batch,
    "noise-scale": _noise_scale,
    "report": _report,
    "sweep": _sweep,
}
"""Commands with their own argument parser: everything after the command name goes to it."""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="largebatch",
        description="Distributed large-batch training with one global-batch contract.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    train = commands.add_parser("train", help="train a config, alone or under torchrun")
    _add_config_args(train)
    train.set_defaults(func=_train)

    plan = commands.add_parser(
        "plan", help="print the batch plan, peak LR and lengths a config gives, and exit"
    )
    _add_config_args(plan)
    plan.add_argument("--world-size", type=int, default=1, help="processes the job will run on")
    plan.add_argument(
        "--nproc-per-node",
        type=int,
        help="processes on each node (default: all of --world-size on one); "
        "sets the threads each process runs, by the trainer's rule",
    )
    plan.add_argument(
        "--examples",
        type=int,
        help="plan for a training set of this size without reading the data "
        "(e.g. 1281167 for ImageNet before it is on this machine)",
    )
    from largebatch import gpus

    gpus.add_arguments(plan)
    plan.set_defaults(func=_plan)

    build = commands.add_parser(
        "build",
        help="build the compiled kernels runs use (fused LAMB/LARS; DeepSpeed's CPU comm op) ahead, "
        "into $TORCH_EXTENSIONS_DIR",
    )
    build.set_defaults(func=_build)

    from largebatch.bench import listing

    bench = commands.add_parser(
        "bench",
        help="benchmarks that print ratios against a baseline",
        description=f"Benchmarks that print ratios against a baseline:\n{listing()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("what", metavar="name", help="which benchmark (listed above)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    bench.set_defaults(func=_bench)

    commands.add_parser(
        "find-batch", help="micro-batch size vs memory and speed, and the plan that fits"
    )
    commands.add_parser(
        "noise-scale",
        help="the gradient noise scale B_simple at a checkpoint, fitted over batch sizes",
    )
    commands.add_parser(
        "cbs",
        help="the critical batch at a checkpoint, by branching short runs at several global batches",
    )
    commands.add_parser("report", help="PNG plots and one HTML page from run directories")
    commands.add_parser(
        "sweep", help="train at several global batches to a target; fit steps vs examples (B_crit)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in SUBPROGRAMS:
            return SUBPROGRAMS[argv[0]](argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"largebatch: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"largebatch: stopped: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
