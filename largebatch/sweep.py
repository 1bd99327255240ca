"""`largebatch sweep`: one training per (global batch, LR, optimizer), each to a held-out target, and the fit of
McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", eq. 2.11) to the steps and examples it took:

    (S / S_min − 1)(E / E_min − 1) = 1,  i.e. with E = B·S:  S(B) = S_min + E_min / B,

a line in 1/B fitted by least squares to the fewest steps at each batch size; B_crit = E_min / S_min, the batch at
which a run takes twice the fewest steps and twice the fewest examples. The critical batch of Zhang et al. 2025 is
where steps exceed perfect linear scaling from the smallest batch swept, B_0, by 20 %: from the fit,
B_20% = 1.2·B_0 + 0.2·B_crit. Every point is its own run directory under SWEEP_DIR/points; a sweep started again
keeps the points that finished and resumes the others (from their checkpoints, with train.checkpoint_every).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from largebatch import config, job
from largebatch.dist import torchrun_command
from largebatch.errors import ArgumentParser, UserError

COLUMNS = (
    "global_batch",
    "lr",
    "optimizer",
    "peak_lr",
    "reached",
    "steps",
    "examples",
    "metric",
    "final",
    "wall_s",
    "noise_scale",
    "status",
    "run_dir",
)
EVALS_PER_RUN = 100
"""With a target, each point evaluates at least this often over its length (more often if train.eval_every says so),
to resolve when it reaches the target."""


@dataclass(frozen=True)
class Point:
    global_batch: int
    lr: float | None
    optimizer: str | None

    @property
    def name(self) -> str:
        parts = [
            f"b{self.global_batch}",
            *([f"lr{self.lr:g}"] if self.lr is not None else []),
            *([self.optimizer.replace(":", "-")] if self.optimizer else []),
        ]
        return "_".join(parts)

    def overrides(self) -> list[str]:
        return [
            f"batch.global_size={self.global_batch}",
            *([f"optim.lr={self.lr!r}"] if self.lr is not None else []),
            *([f"optim.name={self.optimizer}"] if self.optimizer else []),
        ]


@dataclass(frozen=True)
class Fit:
    """S(B) = S_min + E_min / B over the fewest steps at each batch size, with 1-σ errors (least squares)."""

    s_min: float
    e_min: float
    b_crit: float
    s_min_err: float
    e_min_err: float
    b_crit_err: float
    b_20: float
    """The batch at which steps exceed perfect linear scaling from the smallest swept batch by 20 %."""
    points: int


def fit(batches: list[float], steps: list[float]) -> Fit | None:
    """Least squares of steps on 1/batch; None with fewer than two batch sizes or no positive S_min and E_min (steps
    falling as fast as 1/B over the whole range: sweep larger batches)."""
    if len(set(batches)) < 2:
        return None
    x, y = 1 / np.asarray(batches, float), np.asarray(steps, float)
    design = np.stack([np.ones_like(x), x], axis=1)
    (s_min, e_min), *_ = np.linalg.lstsq(design, y, rcond=None)
    if s_min <= 1e-6 * y.max() or e_min <= 0:
        return None
    dof = len(x) - 2
    if dof > 0:
        residual = y - design @ np.array([s_min, e_min])
        cov = residual @ residual / dof * np.linalg.inv(design.T @ design)
    else:  # two points: the line is exact, with no estimate of its error
        cov = np.full((2, 2), math.nan)
    b_crit = e_min / s_min
    rel = np.array([-1 / s_min, 1 / e_min])  # ∂ log B_crit / ∂ (S_min, E_min)
    b_crit_err = b_crit * math.sqrt(max(0.0, rel @ cov @ rel)) if dof > 0 else math.nan
    return Fit(
        float(s_min),
        float(e_min),
        float(b_crit),
        float(math.sqrt(cov[0, 0])),
        float(math.sqrt(cov[1, 1])),
        float(b_crit_err),
        float(1.2 * min(batches) + 0.2 * b_crit),
        len(x),
    )


def best_per_batch(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each batch size, the point (LR, optimizer) that reached the target in the fewest steps."""
    reached = [r for r in rows if r["reached"]]
    return [
        min(group, key=lambda r: r["steps"])
        for _, group in itertools.groupby(
            sorted(reached, key=lambda r: r["global_batch"]), key=lambda r: r["global_batch"]
        )
    ]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    best = best_per_batch(rows)
    result = fit([r["global_batch"] for r in best], [r["steps"] for r in best])
    noise = [r["noise_scale"] for r in best if r["noise_scale"] is not None]
    return {
        "fit": asdict(result) if result else None,
        "best": [r["run_dir"] for r in best],
        "noise_scale": statistics.median(noise) if noise else None,
    }


def row(
    point: Point, run_dir: Path, target: config.Target | None, wall_s: float, status: str
) -> dict[str, Any]:
    """The table row of a finished point, from its summary.json and metrics.jsonl."""
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reached = (summary.get("target") or {}).get("reached")
    metric = (
        target.key
        if target
        else next((k for k in ("eval/accuracy", "eval/loss") if k in records[-1]), None)
    )
    upto = reached["step"] if reached else summary["steps"]
    noise = [r["gns"] for r in records if "gns" in r and r["step"] <= upto]
    return {
        "global_batch": summary["global_batch"],
        "lr": point.lr,
        "optimizer": point.optimizer,
        "peak_lr": summary["peak_lr"],
        "reached": reached is not None,
        "steps": reached["step"] if reached else None,
        "examples": reached["samples"] if reached else None,
        "metric": metric,
        "final": next((r[metric] for r in reversed(records) if metric in r), None),
        "wall_s": round(wall_s, 2),
        "noise_scale": statistics.median(noise) if noise else None,
        "status": status,
        "run_dir": str(run_dir),
    }


def _launch(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "largebatch", *args]
    if nproc > 1:
        command = [*torchrun_command(nproc), "-m", "largebatch", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def sweep(
    config_path: str | None,
    overrides: list[str],
    global_sizes: list[int],
    out: Path,
    lrs: list[float] | None = None,
    optimizers: list[str] | None = None,
    target: str | None = None,
    nproc: int = 1,
) -> dict[str, Any]:
    """Run (or resume) every point, write sweep.csv and sweep.json after each, and return sweep.json's content.
    Every point's config is checked before the first one trains."""
    goal = config.Target.parse(target, "--target") if target else None
    points = [
        Point(b, lr, opt)
        for b, lr, opt in itertools.product(global_sizes, lrs or [None], optimizers or [None])
    ]
    examples, evals = None, {}
    for (
        point
    ) in points:  # the first reads the data and checks the model; the others plan for its size
        cfg = config.load(
            config_path, [*overrides, *point.overrides(), f"run.dir={out / 'points' / point.name}"]
        )
        prepared = job.prepare(cfg, nproc, train_examples=examples)
        examples = prepared.train_examples
        often = max(1, prepared.total_steps // EVALS_PER_RUN)
        evals[point] = (
            [f"train.eval_every={min(often, cfg.train.eval_every or often)}"] if goal else []
        )
    rows = []
    for i, point in enumerate(points, 1):
        run_dir = out / "points" / point.name
        done = out / "points" / f"{point.name}.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            print(f"sweep: {i}/{len(points)} {point.name}: done before, kept", flush=True)
            continue
        args = [
            "train",
            *(["--config", config_path] if config_path else []),
            *overrides,
            *point.overrides(),
            *evals[point],
            *([f"train.target={target}"] if target else []),
            f"run.dir={run_dir}",
            "logging.progress=false",
        ]
        start = time.perf_counter()
        result = _launch(args, nproc)
        if result.returncode == 2:
            raise UserError(f"point {point.name}: {result.stderr.strip().splitlines()[-1]}")
        status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        if result.returncode:
            print(result.stderr[-2000:], file=sys.stderr)
            rows.append(
                {
                    **dict.fromkeys(COLUMNS),
                    **asdict(point),
                    "reached": False,
                    "status": status,
                    "run_dir": str(run_dir),
                }
            )
        else:
            rows.append(row(point, run_dir, goal, time.perf_counter() - start, status))
            done.write_text(json.dumps(rows[-1]) + "\n")
        print(f"sweep: {i}/{len(points)} {point.name}: {_outcome(rows[-1], goal)}", flush=True)
        write(out, rows, goal)
    return write(out, rows, goal)


def write(out: Path, rows: list[dict[str, Any]], goal: config.Target | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in COLUMNS} for r in rows)
    result = {"target": asdict(goal) if goal else None, "points": rows, **summarise(rows)}
    (out / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _outcome(r: dict[str, Any], goal: config.Target | None) -> str:
    if r["status"] != "ok":
        return r["status"]
    final = (
        f"final {r['metric']} {r['final']:.4f}" if r["final"] is not None else "no held-out metric"
    )
    if goal is None:
        return f"{final} in {r['wall_s']:.0f} s"
    if not r["reached"]:
        return f"{goal.key}={goal.value:g} not reached ({final}) in {r['wall_s']:.0f} s"
    return (
        f"{goal.key} reached at step {r['steps']} ({r['examples']} examples) in {r['wall_s']:.0f} s"
    )


def describe(result: dict[str, Any]) -> str:
    f = result["fit"]
    if result["target"] is None:
        return (
            "no target (each point ran its budget): compare the final held-out metric in sweep.csv"
        )
    if f is None:
        return (
            "no fit: it needs the target reached at 2+ batch sizes, with steps falling slower than 1/B "
            "(sweep larger batches, or train longer)"
        )

    def err(v: float) -> str:
        return f" ± {v:.3g}" if math.isfinite(v) else ""

    noise = result["noise_scale"]
    return (
        f"fit over {f['points']} batch sizes: S_min {f['s_min']:.4g}{err(f['s_min_err'])} steps, E_min "
        f"{f['e_min']:.4g}{err(f['e_min_err'])} examples, B_crit = E_min/S_min {f['b_crit']:.4g}"
        f"{err(f['b_crit_err'])}; 20 % over linear scaling at batch {f['b_20']:.4g}"
        + (
            f"; measured noise scale (median) {noise:.4g} = {noise / f['b_crit']:.2f}× B_crit"
            if noise
            else ""
        )
    )


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise UserError(
            f"{option}={text} must be a comma-separated list of positive numbers, e.g. 64,128,256"
        )
    return values


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="largebatch sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file every point starts from")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument(
        "--global-sizes", required=True, help="comma-separated global batches, e.g. 64,128,256"
    )
    parser.add_argument(
        "--lrs", help="comma-separated optim.lr values (each at optim.reference_batch, scaled)"
    )
    parser.add_argument("--optimizers", help="comma-separated optim.name values, e.g. sgd,lars")
    parser.add_argument(
        "--target",
        help="eval/<metric>=VALUE each run stops at, e.g. eval/accuracy=0.97 (default: "
        "each runs its full length, the budget)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("sweep"), help="sweep directory (default: sweep/)"
    )
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes per training (torchrun on this machine)"
    )
    args = parser.parse_intermixed_args(argv)  # section.key=value before or after the options
    if args.nproc < 1:
        raise UserError(f"--nproc={args.nproc} must be at least 1")
    result = sweep(
        args.config,
        args.overrides,
        _numbers(args.global_sizes, int, "--global-sizes"),
        args.out,
        _numbers(args.lrs, float, "--lrs") if args.lrs else None,
        [o.strip() for o in args.optimizers.split(",") if o.strip()] if args.optimizers else None,
        args.target,
        args.nproc,
    )
    print(describe(result))
    print(
        f"wrote {args.out / 'sweep.csv'} and {args.out / 'sweep.json'}; plot: largebatch report {args.out}"
    )
    return 0
