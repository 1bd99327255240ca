"""Gradient noise scale: the batch size beyond which larger batches stop paying.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", App. A.1: from the
squared norms of the mean gradient over a small batch B_s and a big batch B_b,

    |G|² ≈ (B_b·|G_b|² − B_s·|G_s|²) / (B_b − B_s)        S ≈ (|G_s|² − |G_b|²) / (1/B_s − 1/B_b)

and B_noise = S / |G|² (the "simple" noise scale, ≈ the critical batch size). Both estimates are
unbiased but noisy, so each is smoothed with an exponential moving average before taking the ratio.
In data parallelism (as AdaptDL and fairscale's AdaScale do) the small batch is each rank's share,
measured before the all-reduce, and the big batch the global one after it; on one process with
accumulation, the small batch is the first micro-batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


def estimate(sq_small: float, b_small: int, sq_big: float, b_big: int) -> tuple[float, float]:
    """Unbiased (|G|², S) from squared gradient norms at two batch sizes."""
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1 / b_small - 1 / b_big)
    return g2, trace


@dataclass
class NoiseScale:
    """Smoothed |G|² and S, and their ratio B_noise, updated every train.noise_every steps."""

    decay: float = 0.9
    g2: float | None = None
    trace: float | None = None
    count: int = 0
    """Measurements so far."""

    @property
    def value(self) -> float | None:
        """B_noise once the averages span their window (1 / (1 − decay) measurements), else None: the first
        estimates at small batches scatter by ±50 %, too much to act on."""
        if self.count * (1 - self.decay) < 1 or not self.g2 or self.g2 <= 0:
            return None
        return self.trace / self.g2

    def update(self, sq_small: float, b_small: int, sq_big: float, b_big: int) -> None:
        g2, trace = estimate(sq_small, b_small, sq_big, b_big)
        self.g2 = g2 if self.g2 is None else self.decay * self.g2 + (1 - self.decay) * g2
        self.trace = (
            trace if self.trace is None else self.decay * self.trace + (1 - self.decay) * trace
        )
        self.count += 1

    def record(self) -> dict[str, float]:
        """The latest smoothed values, for a metrics record ({} before the first measurement)."""
        if self.g2 is None:
            return {}
        out = {"gns/grad_sq": self.g2, "gns/trace": self.trace}
        if self.g2 > 0:
            out["gns"] = self.trace / self.g2
        return out

    def state_dict(self) -> dict[str, Any]:
        """The smoothed estimates, so a resumed run continues the same averages."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.g2, self.trace, self.count = (
            state["decay"],
            state["g2"],
            state["trace"],
            state["count"],
        )
