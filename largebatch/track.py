"""Where metrics go: metrics.jsonl and summary.json in the run directory, and a progress line, on rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Tracker:
    """`last` is the newest record, including one logged before a resume."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool, total_steps: int, start_step: int) -> None:
        self.progress = progress and enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.start = time.perf_counter()
        self.last: dict[str, Any] = {}
        self._jsonl: TextIO | None = self._open(run_dir / "metrics.jsonl", start_step) if enabled else None

    def _open(self, path: Path, start_step: int) -> TextIO:
        """On resume keep the records up to the checkpoint's step (later ones are being redone)."""
        kept = []
        if start_step and path.exists():
            kept = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= start_step]
        self.last = kept[-1] if kept else {}
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        self.last = record
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.progress:
            print(self._line(record), file=sys.stdout, flush=True)

    def _line(self, r: dict[str, Any]) -> str:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(1, r["step"] - self.start_step) * (self.total_steps - r["step"])
        parts = [f"step {r['step']}/{self.total_steps}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.4g}"]
        if "grad_norm" in r:
            parts.append(f"grad {r['grad_norm']:.3g}")
        parts.append(f"{r['samples_per_s']:.0f} samples/s")
        parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith("eval/")]
        parts.append(f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
