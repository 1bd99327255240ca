"""`largebatch noise-scale`: the simple gradient noise scale at a checkpoint, fitted over several batch sizes.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1: the mean gradient
g_B of B examples has E|g_B|² = |G|² + tr(Σ)/B (G the true gradient, Σ the per-example gradient covariance).
K blocks of B_max training examples (drawn with run.seed) are split, for each size B, into disjoint batches of B;
a least-squares fit of the mean |g_B|² against 1/B gives |G|² (intercept) and tr(Σ) (slope), and
B_simple = tr(Σ)/|G|². Every size splits the same examples, so a small size gets many batches and a precise mean.
The spread of |g_B|² grows with its mean, so each size is weighted by 1/(fitted mean)²; resampling the K blocks
(a block bootstrap) gives 68 % intervals. With B_noise ≈ B_simple, the paper's trade-off prices a batch B:
S/S_min = 1 + B_noise/B optimizer steps and E/E_min = 1 + B/B_noise training examples to reach the same loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from largebatch import checkpoint, config, job
from largebatch.errors import ArgumentParser, UserError
from largebatch.task import Task, take, to_device

FINAL_WEIGHTS = "model.pt"
"""Written by a run that finished (every engine writes the whole model there)."""
RESAMPLES = 1000
COVERAGE = 0.68


@dataclass
class Fit:
    """|G|², tr(Σ) and B_simple, each with its 68 % bootstrap interval."""

    grad_sq: float
    trace: float
    b_simple: float
    intervals: dict[str, tuple[float, float]]


def state_of(source: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The training state at `source` (a checkpoint directory, a run directory or a model.pt file: then only its
    "model"), the path it was read from, and the checkpoint's manifest ({} for model.pt)."""
    if not source.exists():
        raise UserError(
            f"--checkpoint {source} does not exist; give a checkpoint directory, a run directory or a "
            f"{FINAL_WEIGHTS}"
        )
    if (
        checkpoint.directory(source).is_dir() or (source / FINAL_WEIGHTS).is_file()
    ):  # a run directory
        found = checkpoint.latest_good(source)
        if found is None and not (source / FINAL_WEIGHTS).is_file():
            raise UserError(
                f"{source} has no complete checkpoint under checkpoints/ and no {FINAL_WEIGHTS}; give "
                f"another checkpoint directory, or train with train.checkpoint_every"
            )
        source = found or source / FINAL_WEIGHTS
    if source.is_file():
        try:
            return source, {"model": torch.load(source, map_location="cpu", weights_only=True)}, {}
        except Exception as exc:
            raise UserError(
                f"{source} is not a readable state dict ({type(exc).__name__}); give a checkpoint "
                f"directory, a run directory or a run's {FINAL_WEIGHTS}"
            ) from None
    if not (source / checkpoint.MANIFEST).is_file():
        raise UserError(
            f"{source} is neither a checkpoint directory (no {checkpoint.MANIFEST}) nor a run directory "
            f"(no checkpoints/ or {FINAL_WEIGHTS}); give one of them, or a {FINAL_WEIGHTS}"
        )
    problem = checkpoint.verify(source)
    if problem:
        raise UserError(
            f"checkpoint {source} is unusable: {problem}; pick an older one under checkpoints/"
        )
    manifest = checkpoint.manifest(source)
    state = checkpoint.load(source)
    if "model" not in state:
        engine = manifest["meta"].get("engine.name")
        raise UserError(
            f"checkpoint {source} holds engine.name={engine} shards, which load only in that engine's "
            f"process group; give the run's {FINAL_WEIGHTS} (written when it finishes) instead"
        )
    return source, state, manifest


def check_trained_with(source: Path, saved: dict[str, Any], prepared: job.Job) -> None:
    """Raise UserError if the checkpoint's meta (`saved`) names other data or another model than `prepared`."""
    for key, value in prepared.identity().items():
        if key.startswith(("data.", "model.")) and key in saved and saved[key] != value:
            raise UserError(
                f"checkpoint {source} was trained with {key}={saved[key]}, this config has {value}; "
                f"pass the config it was trained with"
            )


def load_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], source: Path, cfg: config.Config
) -> None:
    """Load `weights` into the model job.prepare built; UserError when they belong to another model."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(
            f"{source} does not fit model.name={cfg.model.name} ({str(exc).strip().splitlines()[0]}); "
            f"pass the config it was trained with"
        ) from None


def default_sizes(largest: int, count: int = 8) -> list[int]:
    """`largest` and the powers of two below it, the `count` largest of them."""
    powers = [1 << k for k in range(largest.bit_length()) if 1 << k < largest]
    return [*powers, largest][-count:]


def squared_norms(
    model: nn.Module,
    task: Task,
    sizes: list[int],
    blocks: int,
    chunk: int,
    seed: int,
    device: torch.device,
) -> list[np.ndarray]:
    """For each size B, |g_B|² of the disjoint batches of B that `blocks` blocks of max(sizes) training examples split
    into: an array [block, batch in block]. A batch's gradient is that of its summed loss ÷ its count of loss terms,
    accumulated over chunks of at most `chunk` examples."""
    largest = max(sizes)
    generator = torch.Generator().manual_seed(seed)
    drawn = (
        torch.randperm(len(task.train), generator=generator)[: blocks * largest]
        .view(blocks, largest)
        .tolist()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()  # the gradients training takes (dropout, batch statistics)
    out = []
    for size in sizes:
        sq = np.empty((blocks, largest // size))
        for k, block in enumerate(drawn):
            for j in range(sq.shape[1]):
                model.zero_grad(set_to_none=True)
                count = 0.0
                for start in range(j * size, (j + 1) * size, chunk):
                    inputs, targets = to_device(
                        take(task.train, block[start : min(start + chunk, (j + 1) * size)]), device
                    )
                    total, terms, _ = task.score(model, inputs, targets)
                    total.backward()
                    count += float(terms)
                if count == 0:
                    raise UserError(
                        f"a batch of {size} training examples has no loss terms (every target ignored); "
                        f"use larger --sizes"
                    )
                grad_sq = torch.stack(
                    [p.grad.double().square().sum() for p in params if p.grad is not None]
                ).sum()
                sq[k, j] = grad_sq.item() / count**2
        out.append(sq)
    return out


def _weighted_line(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intercept and slope of y ≈ a + b·x along the last axis, weighted by 1/y², then by 1/(that fit)²."""
    weights = 1 / y**2
    for _ in range(2):
        sw, sx, sy = weights.sum(-1), (weights * x).sum(-1), (weights * y).sum(-1)
        sxx, sxy = (weights * x * x).sum(-1), (weights * x * y).sum(-1)
        slope = (sw * sxy - sx * sy) / (sw * sxx - sx**2)
        intercept = (sy - slope * sx) / sw
        fitted = intercept[..., None] + slope[..., None] * x
        weights = 1 / np.where(fitted > 0, fitted, y) ** 2
    return intercept, slope


def _ratio(trace: np.ndarray, grad_sq: np.ndarray) -> np.ndarray:
    """tr(Σ)/|G|², infinite where |G|² ≤ 0 (the gradient lost in the noise of the largest batch)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(grad_sq > 0, trace / grad_sq, np.inf)


def fit(sizes: list[int], sq: list[np.ndarray], seed: int) -> Fit:
    """Fit mean |g_B|² = |G|² + tr(Σ)/B over the sizes; intervals from resampling the blocks (all sizes together)."""
    x = 1 / np.asarray(sizes, dtype=float)
    block_means = np.stack([s.mean(1) for s in sq], axis=-1)  # [block, size]
    grad_sq, trace = _weighted_line(x, block_means.mean(0))
    picks = np.random.default_rng(seed).integers(0, len(block_means), (RESAMPLES, len(block_means)))
    boot_g2, boot_trace = _weighted_line(x, block_means[picks].mean(1))
    tails = [int(t * RESAMPLES) for t in ((1 - COVERAGE) / 2, (1 + COVERAGE) / 2)]
    intervals = {
        name: tuple(float(v) for v in np.sort(values)[tails])
        for name, values in (
            ("grad_sq", boot_g2),
            ("trace", boot_trace),
            ("b_simple", _ratio(boot_trace, boot_g2)),
        )
    }
    return Fit(float(grad_sq), float(trace), float(_ratio(trace, grad_sq)), intervals)


def tradeoff(batch: int, b_noise: float) -> tuple[float, float]:
    """(S/S_min, E/E_min): steps and examples at `batch` relative to their minima, as McCandlish et al. model them."""
    return 1 + b_noise / batch, 1 + batch / b_noise


def checkpoint_parser(command: str, doc: str, checkpoint_help: str) -> ArgumentParser:
    """The parser of a `largebatch COMMAND` that measures at a checkpoint: --config, overrides and --checkpoint."""
    parser = ArgumentParser(prog=f"largebatch {command}", description=doc.splitlines()[0])
    parser.add_argument("--config", help="YAML config file the checkpoint was trained with")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--checkpoint", required=True, type=Path, help=checkpoint_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = checkpoint_parser(
        "noise-scale",
        __doc__,
        "checkpoint directory, run directory (its latest good checkpoint, else model.pt), or model.pt",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=8,
        help="disjoint batches of the largest size (K); each smaller size splits the same examples",
    )
    parser.add_argument(
        "--sizes",
        help="comma-separated batch sizes (default: the global batch, or the largest that "
        "K batches of fit in the training set, and 7 powers of two below it)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_intermixed_args(argv)  # section.key=value before or after the options
    if args.batches < 2:
        raise UserError(
            f"--batches={args.batches} must be at least 2 (the spread between them is the uncertainty)"
        )
    source, state, manifest = state_of(args.checkpoint)
    cfg = config.load(args.config, args.overrides)
    micro = cfg.batch.micro_size if isinstance(cfg.batch.micro_size, int) else None
    if (
        cfg.batch.global_size is not None
    ):  # one process measures: the global batch alone is its plan
        cfg.batch.micro_size = cfg.batch.accum_steps = None
    cfg.run.resume, cfg.train.noise_scale = "never", False
    prepared = job.prepare(cfg, 1)
    check_trained_with(source, manifest.get("meta", {}), prepared)
    sizes = _sizes(args.sizes, args.batches, prepared.plan.global_batch, prepared.train_examples)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(prepared.threads)
    # job.prepare built and checked the model once; the checkpoint's weights replace its own
    model = prepared.model
    load_weights(model, state["model"], source, cfg)
    sq = squared_norms(
        model.to(device),
        prepared.task,
        sizes,
        args.batches,
        micro or max(sizes),
        cfg.run.seed,
        device,
    )
    result = fit(sizes, sq, cfg.run.seed)
    if not result.grad_sq > 0:
        raise UserError(
            f"|G|² fitted as {result.grad_sq:.3g} ≤ 0: the mean gradient is lost in the noise of "
            f"batches up to {max(sizes)} (as near a minimum of the training loss); use larger --sizes, "
            f"more --batches, or an earlier checkpoint"
        )
    step = manifest.get("step")
    report(source, step, device, sizes, sq, result, prepared.plan.global_batch)
    if args.json:
        args.json.write_text(
            json.dumps(
                as_json(source, step, sizes, sq, result, prepared.plan.global_batch), indent=2
            )
            + "\n"
        )
    return 0


def _sizes(given: str | None, blocks: int, global_batch: int, examples: int) -> list[int]:
    """--sizes, or the defaults; checked against the training set."""
    if given:
        try:
            sizes = sorted({int(s) for s in given.split(",")})
        except ValueError:
            raise UserError(
                f"--sizes={given} must be comma-separated integers, e.g. 16,64,256"
            ) from None
    else:
        sizes = default_sizes(min(global_batch, examples // blocks))
    if len(sizes) < 2 or sizes[0] < 1:
        raise UserError(
            f"the fit needs at least two positive batch sizes, got {sizes}; give e.g. --sizes 16,64,256 "
            f"(or fewer --batches on a training set of {examples})"
        )
    if sizes[-1] * blocks > examples:
        raise UserError(
            f"{blocks} disjoint batches of {sizes[-1]} need {sizes[-1] * blocks} training examples, the "
            f"training set has {examples}; use smaller --sizes or fewer --batches"
        )
    return sizes


def _table(global_batch: int, b_simple: float) -> list[tuple[int, str]]:
    """Batches to price: the global batch, ¼× to 4× it, and B_simple itself."""
    rows = {max(1, round(global_batch * f)): "" for f in (0.25, 0.5, 2, 4)}
    rows[max(1, round(b_simple))] = "≈ B_simple"
    rows[global_batch] = "configured"
    return sorted(rows.items())


def _fmt(value: float) -> str:
    return f"{value:.4g}" if np.isfinite(value) else "∞"


def report(
    source: Path,
    step: int | None,
    device: torch.device,
    sizes: list[int],
    sq: list[np.ndarray],
    result: Fit,
    global_batch: int,
) -> None:
    """The human-readable lines: measurements and fit, B_simple, where the global batch stands, the trade-off."""
    where = f"step {step}" if step is not None else "final weights"
    print(
        f"noise scale of {source} ({where}) on {device.type}, fp32: {len(sq[0])} blocks of {max(sizes)} examples"
    )
    print(f"{'batch':>8} {'batches':>8} {'mean |g_B|²':>12} {'± s.e.':>9} {'fit':>10}")
    for size, s in zip(sizes, sq):
        error = s.mean(1).std(ddof=1) / len(s) ** 0.5
        print(
            f"{size:>8} {s.size:>8} {s.mean():>12.4g} {error:>9.2g} {result.grad_sq + result.trace / size:>10.4g}"
        )
    (g_lo, g_hi), (t_lo, t_hi), (b_lo, b_hi) = (
        result.intervals[k] for k in ("grad_sq", "trace", "b_simple")
    )
    print(
        f"|G|² = {result.grad_sq:.4g} [{_fmt(g_lo)}, {_fmt(g_hi)}], tr(Σ) = {result.trace:.4g} "
        f"[{_fmt(t_lo)}, {_fmt(t_hi)}]  (68 % intervals)"
    )
    print(f"B_simple = tr(Σ)/|G|² = {result.b_simple:.4g} [{_fmt(b_lo)}, {_fmt(b_hi)}]")
    (steps, examples), (steps_2x, examples_2x) = (
        tradeoff(b, result.b_simple) for b in (global_batch, 2 * global_batch)
    )
    print(
        f"global batch {global_batch} = {global_batch / result.b_simple:.3g} × B_simple: doubling it would take "
        f"{steps_2x / steps:.2f}× the steps and {examples_2x / examples:.2f}× the examples"
    )
    print(
        "trade-off with B_noise ≈ B_simple: steps S = S_min·(1 + B_noise/B), examples E = E_min·(1 + B/B_noise)"
    )
    print(f"{'batch':>8} {'steps ×S_min':>13} {'examples ×E_min':>16}")
    for batch, note in _table(global_batch, result.b_simple):
        steps, examples = tradeoff(batch, result.b_simple)
        print(f"{batch:>8} {steps:>13.3g} {examples:>16.3g}  {note}".rstrip())


def as_json(
    source: Path,
    step: int | None,
    sizes: list[int],
    sq: list[np.ndarray],
    result: Fit,
    global_batch: int,
) -> dict[str, Any]:
    """What `report` prints, as one JSON object (non-finite interval ends as null)."""

    def finite(value: float) -> float | None:
        return value if np.isfinite(value) else None

    rows = [(b, *tradeoff(b, result.b_simple)) for b, _ in _table(global_batch, result.b_simple)]
    return {
        "checkpoint": str(source),
        "step": step,
        "sizes": sizes,
        "batches": [s.size for s in sq],
        "mean_grad_sq": [s.mean() for s in sq],
        "grad_sq": result.grad_sq,
        "trace": result.trace,
        "b_simple": result.b_simple,
        "intervals": {k: [finite(lo), finite(hi)] for k, (lo, hi) in result.intervals.items()},
        "global_batch": global_batch,
        "global_over_b_simple": global_batch / result.b_simple,
        "tradeoff": [
            {"batch": b, "steps_over_min": steps, "examples_over_min": examples}
            for b, steps, examples in rows
        ],
    }
