"""Where metrics go, on rank 0 only: metrics.jsonl (always), wandb (optional, never fatal), progress, summary.json."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

from largebatch.job import Job
from largebatch.wandb_sink import WandbSink


class Progress:
    """A rich progress bar on a terminal; plain periodic lines when stdout is not a TTY (logs, CI). Progress is in
    examples, which a batch-size schedule does not change (its steps grow with the batch)."""

    def __init__(self, total_samples: int, start_samples: int) -> None:
        self.total_samples, self.start_samples = total_samples, start_samples
        self.start = time.perf_counter()
        self._bar = None
        if sys.stdout.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self._bar = Bar(
                TextColumn("examples"),
                MofNCompleteColumn(),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self._task = self._bar.add_task("", total=total_samples, completed=start_samples)
            self._bar.start()

    def update(self, r: dict[str, Any]) -> None:
        parts = [
            f"step {r['step']}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.4g}",
            f"grad {r['grad_norm']:.3g}",
            f"{r['samples_per_s']:.0f} samples/s",
            *([f"{r['tokens_per_s']:.0f} tokens/s"] if "tokens_per_s" in r else []),
            *([f"MFU {100 * r['mfu']:.2g}%"] if "mfu" in r else []),
            *(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("eval/")),
        ]
        if self._bar is not None:
            self._bar.update(self._task, completed=r["samples"], description=" | ".join(parts))
            return
        elapsed = time.perf_counter() - self.start
        eta = (
            elapsed
            / max(1, r["samples"] - self.start_samples)
            * (self.total_samples - r["samples"])
        )
        done = f"{100 * r['samples'] / self.total_samples:.0f}%"
        print(
            " | ".join([done, *parts, f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"]),
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


class Tracker:
    """`last` is the newest record, including one logged before a resume."""

    def __init__(self, job: Job, enabled: bool, start_step: int) -> None:
        self.run_dir = job.cfg.run_dir
        self.enabled = enabled
        self.last: dict[str, Any] = {}
        self._jsonl: TextIO | None = None
        self._sink: WandbSink | None = None
        self._progress: Progress | None = None
        if not enabled:
            return
        self._jsonl = self._open(self.run_dir / "metrics.jsonl", start_step)
        log = job.cfg.logging
        if log.progress:
            self._progress = Progress(
                job.total_samples, self.last.get("samples", 0)
            )  # the ETA's starting point
        if log.wandb != "disabled":
            config = {**job.cfg.to_dict(), "derived": job.derived()}
            self._sink = WandbSink(
                log.wandb, log.project, self.run_dir, config, self._wandb_id(start_step)
            )

    def _open(self, path: Path, start_step: int) -> TextIO:
        """On resume keep the records up to the checkpoint's step (later ones are being redone)."""
        kept = []
        if start_step and path.exists():
            kept = [
                r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= start_step
            ]
        self.last = kept[-1] if kept else {}
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return path.open("a")

    def _wandb_id(self, start_step: int) -> str:
        """A resumed job continues its wandb run; a fresh one starts a new run."""
        path = self.run_dir / "wandb_run_id"
        if start_step and path.exists():
            return path.read_text().strip()
        run_id = uuid.uuid4().hex[:16]
        path.write_text(run_id + "\n")
        return run_id

    def log(self, record: dict[str, Any]) -> None:
        self.last = record
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._sink is not None:
            self._sink.log(record)
        if self._progress is not None:
            self._progress.update(record)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json and close every sink."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.close()
        self._jsonl.close()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self._sink is not None:
            self._sink.finish(summary)
