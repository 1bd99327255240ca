"""`largebatch report RUN_DIR... [--out DIR]`: PNG plots and one self-contained HTML page comparing runs.

Reads only each run directory's metrics.jsonl, summary.json and config.yaml, so it works offline, without
wandb, and on runs still in progress. Plots are matplotlib `Figure`s rendered by Agg (no pyplot, no display).
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from largebatch.errors import ArgumentParser, UserError

REQUIRED = ("step", "samples", "loss")
STEP, SAMPLES = "optimizer step", "examples seen"


@dataclass
class Run:
    """One run directory as the report sees it."""

    name: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    derived: dict[str, Any]
    color: str = "C0"
    cbs: list[dict[str, Any]] = field(default_factory=list)
    """cbs.jsonl's lines (train.cbs_every): the branched critical batch over training."""

    @property
    def global_batch(self) -> int | None:
        return self.summary.get("global_batch", self.derived.get("global_batch"))

    @property
    def label(self) -> str:
        return f"{self.name} (global {self.global_batch})" if self.global_batch else self.name

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """The (x, key) pairs of the records that have a number for `key`."""
        points = [(r[x], r[key]) for r in self.records if _number(r.get(key))]
        return [p[0] for p in points], [p[1] for p in points]

    def last(self, key: str) -> Any:
        return next((r[key] for r in reversed(self.records) if _number(r.get(key))), None)


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """Read a run directory; anything missing or unreadable is a UserError saying which file and what to do."""
    if not run_dir.is_dir():
        raise UserError(
            f"run directory {run_dir} does not exist; pass the run.dir of a `largebatch train` run"
        )
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(
            f"{run_dir} has no metrics.jsonl; pass a run directory written by `largebatch train`"
        )
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {number} is not valid JSON ({exc.msg}); delete or fix that line "
                "(a run killed mid-write can leave a partial last line)"
            ) from None
        missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
        if missing:
            raise UserError(
                f"{path} line {number} has no {', '.join(missing)}; each line must be one "
                "metrics.jsonl record as `largebatch train` writes it"
            )
        records.append(record)
    if not records:
        raise UserError(
            f"{path} is empty; the run has not logged a step yet (wait for train.log_every steps)"
        )
    summary = _read(run_dir / "summary.json", json.loads, json.JSONDecodeError)
    config = _read(run_dir / "config.yaml", yaml.safe_load, yaml.YAMLError)
    cbs = run_dir / "cbs.jsonl"
    measured = []
    if cbs.is_file():
        try:
            measured = [json.loads(line) for line in cbs.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{cbs} holds a line that is not valid JSON ({exc.msg}); delete or fix that line"
            ) from None
    return Run(name or run_dir.name, records, summary, config.get("derived") or {}, cbs=measured)


def write_report(run_dirs: list[Path], out: Path) -> list[Path]:
    """Write one PNG per panel and report.html (PNGs embedded) under `out`; returns the PNGs, then the HTML."""
    if not run_dirs:
        raise UserError("no run directories given; pass one or more run.dir paths")
    dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    runs = [load_run(d, n) for d, n in zip(dirs, names)]
    for i, run in enumerate(runs):
        run.color = f"C{i % 10}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, caption, panel in PANELS:
        fig = panel(runs)
        if fig is not None:
            FigureCanvasAgg(fig)
            fig.savefig(out / f"{name}.png", dpi=110)
            figures.append((caption, out / f"{name}.png"))
    page = out / "report.html"
    page.write_text(_html(runs, figures))
    return [path for _, path in figures] + [page]


def _read(path: Path, parse: Callable[[str], Any], error: type[Exception]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = parse(path.read_text(errors="replace"))
    except error as exc:
        raise UserError(
            f"{path} is unreadable ({' '.join(str(exc).split())}); fix or delete it"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a mapping; fix or delete it")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _axes(ax: Any, title: str, xlabel: str, ylabel: str, log: bool = False) -> None:
    """Label `ax`; with `log`, a log y axis once the data spans more than a decade (linear reads better below)."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if xlabel == STEP:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    low, high = ax.dataLim.y0, ax.dataLim.y1
    if log and low > 0 and high / low > 10:
        _log_y(ax)
    ax.grid(True, alpha=0.3)


def _log_y(ax: Any) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _lines(runs: list[Run], key: str, x: str, ax: Any, **style: Any) -> bool:
    drawn = False
    for run in runs:
        xs, ys = run.series(key, x)
        if xs:
            ax.plot(xs, ys, color=run.color, label=run.label, **style)
            drawn = True
    return drawn


def _single(
    runs: list[Run],
    key: str,
    title: str,
    ylabel: str,
    x: str = "step",
    log: bool = False,
    **style: Any,
) -> Figure | None:
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    if not _lines(runs, key, x, ax, **style):
        return None
    _axes(ax, title, STEP if x == "step" else SAMPLES, ylabel, log)
    ax.legend(fontsize="small")
    return fig


def loss_panel(runs: list[Run]) -> Figure:
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    by_step, by_samples = fig.subplots(1, 2)
    _lines(runs, "loss", "step", by_step)
    _lines(runs, "loss", "samples", by_samples)
    _axes(
        by_step,
        "Training loss vs optimizer steps",
        STEP,
        "loss (mean over the global batch)",
        log=True,
    )
    _axes(
        by_samples,
        "Training loss vs examples seen",
        SAMPLES,
        "loss (mean over the global batch)",
        log=True,
    )
    by_samples.legend(fontsize="small")
    return fig


def noise_scale_panel(runs: list[Run]) -> Figure | None:
    """B_noise as training goes, with each run's global batch drawn beside it: below B_noise a larger batch would
    still cut steps almost in proportion; above it, steps barely fall (McCandlish et al. 2018)."""
    measured = [run for run in runs if run.series("gns")[0]]
    if not measured:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _lines(measured, "gns", "samples", ax)
    for run in measured:
        xs, ys = run.series("global_batch", "samples")
        if not xs and run.global_batch:
            xs, ys = (
                [run.series("gns", "samples")[0][0], run.series("gns", "samples")[0][-1]],
                [run.global_batch] * 2,
            )
        ax.step(
            xs,
            ys,
            where="post",
            color=run.color,
            ls="--",
            lw=1.2,
            label=f"{run.label}: global batch",
        )
    _axes(ax, "Gradient noise scale B_noise and the global batch", SAMPLES, "examples", log=True)
    ax.legend(fontsize="small")
    return fig


def critical_batch_panel(runs: list[Run]) -> Figure | None:
    """The branched critical batch (train.cbs_every, with its interval) and the noise scale B_noise against
    examples seen, on one plot, each run's global batch dashed: the two measurements of the critical batch."""
    measured = [run for run in runs if any(_number(m.get("critical_batch")) for m in run.cbs)]
    if not measured:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for run in measured:
        points = [m for m in run.cbs if _number(m.get("critical_batch"))]
        xs = [m["samples"] for m in points]
        ys = [m["critical_batch"] for m in points]
        low = [y - (m["interval"][0] or y) for y, m in zip(ys, points)]
        high = [(m["interval"][1] or y) - y for y, m in zip(ys, points)]
        ax.errorbar(
            xs,
            ys,
            yerr=[low, high],
            color=run.color,
            marker="o",
            capsize=3,
            label=f"{run.label}: branched critical batch",
        )
        gns_x, gns_y = run.series("gns", "samples")
        if not gns_x:
            gns_x = [m["samples"] for m in run.cbs if _number(m.get("gns"))]
            gns_y = [m["gns"] for m in run.cbs if _number(m.get("gns"))]
        if gns_x:
            ax.plot(
                gns_x, gns_y, color=run.color, ls=":", label=f"{run.label}: noise scale B_noise"
            )
        batch_x, batch_y = run.series("global_batch", "samples")
        if batch_x:
            ax.step(batch_x, batch_y, where="post", color=run.color, ls="--", lw=1, alpha=0.6)
    _axes(
        ax, "Critical batch: branched (Merrill et al.) and noise scale", SAMPLES, "batch", log=True
    )
    ax.legend(fontsize="small")
    return fig


def sweep_figure(result: dict[str, Any], name: str) -> Figure:
    """Steps vs examples to the target, one point per run, the fitted S = S_min + E_min/B with its asymptotes,
    B_crit, the 20 %-over-linear batch and the measured noise scale marked on the curve."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    reached = [p for p in result["points"] if p["reached"]]
    best = set(result["best"])
    for p in reached:
        ax.scatter(
            p["examples"],
            p["steps"],
            s=60 if p["run_dir"] in best else 25,
            zorder=3,
            color="C0" if p["run_dir"] in best else "C7",
        )
        ax.annotate(
            f"B={p['global_batch']}"
            + (f", lr {p['lr']:g}" if p["lr"] is not None else "")
            + (f", {p['optimizer']}" if p["optimizer"] else ""),
            (p["examples"], p["steps"]),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize="small",
        )
    f = result["fit"]
    if f is not None:
        batches = [p["global_batch"] for p in reached]
        grid = np.geomspace(min(batches) / 4, max(batches) * 8, 200)
        steps = [f["s_min"] + f["e_min"] / b for b in grid]
        ax.plot(
            [s * b for s, b in zip(steps, grid)],
            steps,
            "C0-",
            lw=1.5,
            label=f"fit: (S/S_min − 1)(E/E_min − 1) = 1, S_min {f['s_min']:.3g}, E_min {f['e_min']:.3g}",
        )
        ax.axhline(f["s_min"], color="C0", ls=":", lw=1)
        ax.axvline(f["e_min"], color="C0", ls=":", lw=1)
        marks = [
            (f["b_crit"], "C3", f"B_crit = E_min/S_min = {f['b_crit']:.3g}"),
            (f["b_20"], "C2", f"20 % over linear scaling: B = {f['b_20']:.3g}"),
        ]
        if result["noise_scale"]:
            marks.append(
                (
                    result["noise_scale"],
                    "C1",
                    f"measured noise scale (median) {result['noise_scale']:.3g}",
                )
            )
        for b, color, label in marks:
            s = f["s_min"] + f["e_min"] / b
            ax.scatter([s * b], [s], marker="*", s=180, color=color, zorder=4, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    target = result["target"]
    what = f"{target['key']} = {target['value']:g}" if target else "the end of the budget"
    _axes(
        ax,
        f"{name}: steps vs examples to reach {what}",
        "examples to target (E)",
        "optimizer steps to target (S)",
    )
    ax.legend(fontsize="small")
    return fig


def frontiers_figure(sweeps: dict[str, dict[str, Any]]) -> Figure:
    """Several target sweeps on one plot: each one's fewest steps vs examples at each batch and its fitted
    S = S_min + E_min/B, with B_crit (± its 1-σ error) in the legend, to compare frontiers (e.g. of optimizers)."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, result) in enumerate(sweeps.items()):
        color = f"C{i % 10}"
        best = set(result["best"])
        points = [p for p in result["points"] if p["reached"] and p["run_dir"] in best]
        ax.plot(
            [p["examples"] for p in points],
            [p["steps"] for p in points],
            "o",
            color=color,
            zorder=3,
        )
        for p in points:
            ax.annotate(
                f"B={p['global_batch']}",
                (p["examples"], p["steps"]),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize="x-small",
                color=color,
            )
        f = result["fit"]
        if f is None:
            ax.plot([], [], "o", color=color, label=f"{name}: no fit")
            continue
        batches = [p["global_batch"] for p in points]
        grid = np.geomspace(min(batches) / 4, max(batches) * 8, 200)
        steps = f["s_min"] + f["e_min"] / grid
        error = f" ± {f['b_crit_err']:.3g}" if math.isfinite(f["b_crit_err"]) else ""
        ax.plot(
            steps * grid,
            steps,
            "-",
            color=color,
            lw=1.5,
            label=f"{name}: S_min {f['s_min']:.3g}, E_min {f['e_min']:.3g}, B_crit {f['b_crit']:.3g}{error}",
        )
        s = f["s_min"] + f["e_min"] / f["b_crit"]
        ax.scatter([s * f["b_crit"]], [s], marker="*", s=160, color=color, zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    targets = {f"{r['target']['key']} = {r['target']['value']:g}" for r in sweeps.values()}
    _axes(
        ax,
        f"Steps vs examples to reach {' / '.join(sorted(targets))} (★ B_crit)",
        "examples to target (E)",
        "optimizer steps to target (S)",
    )
    ax.legend(fontsize="small")
    return fig


def trust_ratio_panel(runs: list[Run]) -> Figure | None:
    """One heatmap per run: log10 of each layer's trust ratio (LARS/LAMB) at each logged step."""
    tables = []
    for run in runs:
        layers = list(
            dict.fromkeys(k for r in run.records for k in r if k.startswith("trust_ratio/"))
        )
        rows = [r for r in run.records if any(k in r for k in layers)]
        if layers:
            grid = [
                [math.log10(r[k]) if _number(r.get(k)) and r[k] > 0 else math.nan for r in rows]
                for k in layers
            ]
            tables.append((run, layers, [r["step"] for r in rows], grid))
    if not tables:
        return None
    height = sum(1.2 + 0.22 * len(layers) for _, layers, _, _ in tables)
    fig = Figure(figsize=(10, max(3.0, height)), layout="constrained")
    axes = fig.subplots(len(tables), 1, squeeze=False)[:, 0]
    for ax, (run, layers, steps, grid) in zip(axes, tables):
        image = ax.imshow(
            grid,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(steps[0], max(steps[-1], steps[0] + 1), len(layers) - 0.5, -0.5),
        )
        ax.set_yticks(
            range(len(layers)), [k.removeprefix("trust_ratio/") for k in layers], fontsize="x-small"
        )
        ax.set(title=f"Per-layer trust ratio: {run.label}", xlabel=STEP)
        fig.colorbar(image, ax=ax, label="log10 trust ratio")
    return fig


PANELS: list[tuple[str, str, Callable[[list[Run]], Figure | None]]] = [
    ("loss", "Training loss against optimizer steps and against examples seen.", loss_panel),
    (
        "lr",
        "Learning-rate schedule (warmup, then decay) at each logged step.",
        lambda runs: _single(runs, "lr", "Learning rate", "learning rate"),
    ),
    (
        "grad_norm",
        "Global gradient norm before clipping.",
        lambda runs: _single(
            runs, "grad_norm", "Gradient norm", "‖g‖ (global, before clipping)", log=True
        ),
    ),
    (
        "throughput",
        "Training throughput between logged steps.",
        lambda runs: _single(runs, "samples_per_s", "Throughput", "samples/s"),
    ),
    (
        "eval_accuracy",
        "Held-out accuracy against examples seen.",
        lambda runs: _single(
            runs, "eval/accuracy", "Held-out accuracy", "accuracy", x="samples", marker="o"
        ),
    ),
    (
        "noise_scale",
        "Gradient noise scale B_noise (McCandlish et al. 2018) as training goes, each run's global batch "
        "dashed: where the batch is below B_noise a larger one would still cut steps almost in proportion; above it, "
        "it costs examples for few steps saved.",
        noise_scale_panel,
    ),
    (
        "critical_batch",
        "The critical batch measured two ways against examples seen: by branching short runs at several batches "
        "(train.cbs_every; bars: the interval) and the gradient noise scale B_noise (dotted); each run's global "
        "batch dashed.",
        critical_batch_panel,
    ),
    ("trust_ratio", "Per-layer trust ratios (LARS/LAMB) over training.", trust_ratio_panel),
]


def _row(run: Run) -> list[str]:
    s, d = run.summary, run.derived
    plan = [s.get(k, d.get(k)) for k in ("world_size", "micro_batch", "accum_steps")]
    accuracy = s.get("eval", {}).get("accuracy", run.last("eval/accuracy"))
    cells = [
        run.name,
        run.global_batch,
        " × ".join(map(str, plan)) if None not in plan else None,
        _fmt(s.get("peak_lr", d.get("peak_lr")), ".4g"),
        s.get("steps", run.records[-1]["step"]),
        _fmt(s.get("samples", run.records[-1]["samples"]), ","),
        _fmt(s.get("final_loss", run.last("loss")), ".4f"),
        _fmt(accuracy, ".4f"),
        _fmt(s.get("samples_per_s", run.last("samples_per_s")), ",.0f"),
        (s.get("params_sha256") or "")[:12] or None,
    ]
    return ["—" if c is None else html.escape(str(c)) for c in cells]


def _fmt(value: Any, spec: str) -> str | None:
    return format(value, spec) if _number(value) else None


def _html(runs: list[Run], figures: list[tuple[str, Path]]) -> str:
    head = [
        "run",
        "global batch",
        "world × micro × accum",
        "peak LR",
        "steps",
        "samples",
        "final loss",
        "eval accuracy",
        "samples/s",
        "params sha256",
    ]
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in _row(run)) + "</tr>\n" for run in runs)
    images = "".join(
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>\n'
        for caption, path in figures
    )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1300px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
        "img{max-width:100%}figure{margin:2em 0}figcaption{color:#555}"
    )
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>largebatch report</title>'
        f"<style>{style}</style></head><body>\n<h1>largebatch report</h1>\n"
        f"<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>\n{rows}</table>\n{images}</body></html>\n"
    )


def budget_figure(sweeps: dict[str, dict[str, Any]]) -> Figure:
    """Final held-out metric vs global batch, one line per sweep (and per LR and optimizer within one)."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    metrics = set()
    for name, result in sweeps.items():
        points = [p for p in result["points"] if p["final"] is not None]
        metrics |= {p["metric"] for p in points}
        for (lr, optimizer), group in itertools.groupby(
            sorted(points, key=lambda p: (str(p["lr"]), str(p["optimizer"]), p["global_batch"])),
            key=lambda p: (p["lr"], p["optimizer"]),
        ):
            group = list(group)
            label = " ".join(
                [
                    name,
                    *([f"lr {lr:g}"] if lr is not None else []),
                    *([optimizer] if optimizer else []),
                ]
            )
            ax.plot(
                [p["global_batch"] for p in group], [p["final"] for p in group], "o-", label=label
            )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    _axes(
        ax,
        "Held-out metric at the end of the budget vs global batch",
        "global batch",
        " / ".join(sorted(metrics)),
    )
    ax.legend(fontsize="small")
    return fig


def write_sweeps(sweep_dirs: list[Path], out: Path) -> list[Path]:
    """For `largebatch sweep` directories: each one with a target, its steps-vs-examples plot (`<name>.png`), and
    with two or more, their frontiers on one plot (`frontiers.png`); those without a target, one plot of the final
    held-out metric vs global batch together (`sweeps.png`)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {
        d.resolve().name: _read(d / "sweep.json", json.loads, json.JSONDecodeError)
        for d in sweep_dirs
    }
    figures = {
        name: sweep_figure(result, name) for name, result in results.items() if result["target"]
    }
    targeted = {name: result for name, result in results.items() if result["target"]}
    if len(targeted) > 1:
        figures["frontiers"] = frontiers_figure(targeted)
    budgets = {name: result for name, result in results.items() if not result["target"]}
    if budgets:
        figures["sweeps"] = budget_figure(budgets)
    for name, fig in figures.items():
        FigureCanvasAgg(fig)
        fig.savefig(out / f"{name}.png", dpi=110)
    return [out / f"{name}.png" for name in figures]


def main(argv: list[str] | None = None) -> int:
    """`largebatch report RUN_DIR|SWEEP_DIR... [--out DIR]`; user errors propagate as UserError (the CLI exits 2)."""
    parser = ArgumentParser(
        prog="largebatch report", description="Plots and an HTML page comparing run directories."
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories (run.dir), or sweep directories (largebatch sweep --out)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("report"), help="output directory (default: report/)"
    )
    args = parser.parse_args(argv)
    sweeps = [d for d in args.run_dirs if (d / "sweep.json").is_file()]
    for path in write_sweeps(sweeps, args.out) if sweeps else []:
        print(f"wrote {path}")
    runs = [d for d in args.run_dirs if d not in sweeps]
    if runs:
        written = write_report(runs, args.out)
        print(f"wrote {written[-1]} and {len(written) - 1} plots in {args.out}")
    return 0
