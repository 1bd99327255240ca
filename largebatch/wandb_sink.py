"""Mirror metrics.jsonl records to one Weights & Biases run, on rank 0; never allowed to stop training.

metrics.jsonl stays the source of truth: any wandb failure (missing package, bad setting, no login,
network down, a log call raising) prints one warning line and turns the sink into a no-op.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

MODES = ("disabled", "offline", "online")

_ENV = {
    "mode": "WANDB_MODE",
    "project": "WANDB_PROJECT",
    "dir": "WANDB_DIR",
    "id": "WANDB_RUN_ID",
    "group": "WANDB_RUN_GROUP",
    "job_type": "WANDB_JOB_TYPE",
    "name": "WANDB_NAME",
    "resume": "WANDB_RESUME",
}
"""wandb.init argument → the variable that, when the user has set it, wins over what largebatch would pass."""


class WandbSink:
    """One wandb run per job: `step` is the default x-axis, `samples` the alternative (pick it in a panel's
    settings)."""

    def __init__(
        self, mode: str, project: str | None, run_dir: Path, config: dict[str, Any], run_id: str
    ) -> None:
        self._run: Any = None
        self._wandb: Any = None
        self._global_batch = config.get("derived", {}).get("global_batch")
        if mode == "disabled":
            return
        try:
            if mode not in MODES:
                raise ValueError(f"logging.wandb={mode!r} is not one of {', '.join(MODES)}")
            import wandb

            self._wandb = wandb
            wanted = {
                "mode": mode,
                "project": project or "largebatch",
                "dir": str(run_dir),
                "id": run_id,
                "resume": "allow",
                "group": config.get("run", {}).get("name"),
                "job_type": "train",
                "name": Path(run_dir).name,
            }
            kwargs = {
                k: v for k, v in wanted.items() if v is not None and not os.environ.get(_ENV[k])
            }
            Path(kwargs.get("dir", ".")).mkdir(parents=True, exist_ok=True)
            self._run = wandb.init(config=config, **kwargs)
            if self._run is None or getattr(self._run, "disabled", False):
                self._run = None
                raise RuntimeError(
                    "wandb.init gave a disabled run (WANDB_MODE=disabled or a login timeout?)"
                )
            self._run.define_metric("step")
            self._run.define_metric("samples")
            self._run.define_metric("*", step_metric="step")
        except Exception as exc:  # noqa: BLE001 - wandb must never stop training
            self._disable(exc)

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, record: dict[str, Any]) -> None:
        """Log one metrics.jsonl record: its numbers, plus a histogram of the per-layer trust ratios."""
        if self._run is None:
            return
        try:
            row = {
                k: v
                for k, v in record.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            ratios = [v for k, v in row.items() if k.startswith("trust_ratio/")]
            if ratios:
                row["trust_ratio/histogram"] = self._wandb.Histogram(ratios)
            if "gns" in row and self._global_batch is not None:
                row["global_batch"] = self._global_batch
            self._run.log(row)
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json's values into the run summary (`eval` flattened to `eval/<metric>`) and close the run."""
        if self._run is None:
            return
        try:
            flat = {k: v for k, v in summary.items() if k != "eval"}
            flat.update({f"eval/{k}": v for k, v in summary.get("eval", {}).items()})
            self._run.summary.update(flat)
            self._run.finish()
        except Exception as exc:  # noqa: BLE001
            self._disable(exc)
        self._run = None

    def _disable(self, exc: Exception) -> None:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"largebatch: warning: wandb disabled: {reason[:300]}", file=sys.stderr, flush=True)
        run, self._run = self._run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001
                pass
