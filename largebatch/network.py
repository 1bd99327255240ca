"""The α–β model of a gradient all-reduce: ring within a node, ring across nodes, DDP's buckets; and its fit.

A ring all-reduce of `n` bytes over `p` ranks sends 2(p−1)/p · n bytes through each link in 2(p−1) latency-bound
rounds (Patarasuk & Yuan 2009; Thakur et al. 2005):  t = 2(p−1)·α + 2(p−1)/p · n/β.
Across `N` nodes of `g` GPUs each, hierarchically (NCCL's tree/ring split, Horovod's hierarchical all-reduce):
reduce-scatter and all-gather inside each node on a ring of `g` (intra-node bandwidth), and an all-reduce of the
node's sum across a ring of `N` nodes at the node's network bandwidth; the three phases run one after another.
DDP sends gradients in buckets (the first 1 MiB, then 25 MiB each), one all-reduce of each, so latency is paid per
bucket while bytes are paid once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from largebatch.errors import UserError

FIRST_BUCKET = 2**20
BUCKET = 25 * 2**20
"""DDP's defaults: `first_bucket_bytes_cap` 1 MiB (sent first, to start communication early) and `bucket_cap_mb` 25."""

BANDWIDTH_UNITS = {
    "b": 1 / 8,
    "kb": 1e3 / 8,
    "mb": 1e6 / 8,
    "gb": 1e9 / 8,
    "tb": 1e12 / 8,
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
}
"""Bandwidth units per second, in bytes: lower-case b for bits (Gb/s), upper-case B for bytes (GB/s, GiB/s)."""
LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_bandwidth(text: str, flag: str) -> float:
    """'100Gb/s', '12.5GB/s', '900GiB/s' → bytes per second."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]+)/s\s*", str(text))
    unit = match and (
        match.group(2) if match.group(2) in BANDWIDTH_UNITS else match.group(2).lower()
    )
    if not match or unit not in BANDWIDTH_UNITS or float(match.group(1)) <= 0:
        raise UserError(
            f"{flag}={text!r} must be a positive rate with a unit, e.g. {flag} 100Gb/s (bits) or {flag} 12.5GB/s"
        )
    return float(match.group(1)) * BANDWIDTH_UNITS[unit]


def parse_latency(text: str, flag: str) -> float:
    """'10us', '5µs', '0.2ms' → seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zµ]+)\s*", str(text))
    if not match or match.group(2) not in LATENCY_UNITS:
        raise UserError(
            f"{flag}={text!r} must be a time with a unit, e.g. {flag} 10us or {flag} 0.5ms"
        )
    return float(match.group(1)) * LATENCY_UNITS[match.group(2)]


@dataclass(frozen=True)
class Network:
    """Per-message latency α (s), the network bandwidth β of each node (bytes/s, shared by its GPUs), the bandwidth
    between GPUs inside a node, and GPUs per node."""

    latency: float
    bandwidth: float
    intra_bandwidth: float
    gpus_per_node: int

    def ring(self, nbytes: float, ranks: int, bandwidth: float) -> float:
        """One flat ring all-reduce of `nbytes` over `ranks`: 2(p−1)·α + 2(p−1)/p · n/β."""
        if ranks <= 1:
            return 0.0
        return 2 * (ranks - 1) * self.latency + 2 * (ranks - 1) / ranks * nbytes / bandwidth

    def all_reduce(self, nbytes: float, gpus: int) -> float:
        """Seconds of one hierarchical all-reduce of `nbytes` over `gpus`: inside a node while they fit in one,
        else reduce-scatter + all-gather inside each node and a ring across the nodes."""
        local = min(gpus, self.gpus_per_node)
        nodes = math.ceil(gpus / self.gpus_per_node)
        return self.ring(nbytes, local, self.intra_bandwidth) + self.ring(
            nbytes, nodes, self.bandwidth
        )

    def gradient_all_reduce(self, nbytes: float, gpus: int) -> float:
        """Seconds of DDP's gradient reduction: one all-reduce per bucket (`buckets`)."""
        return sum(self.all_reduce(size, gpus) for size in buckets(nbytes))


def buckets(nbytes: float) -> list[float]:
    """DDP's bucket sizes for `nbytes` of gradients (parameter boundaries ignored)."""
    sizes = [min(nbytes, FIRST_BUCKET)]
    rest = nbytes - sizes[0]
    while rest > 0:
        sizes.append(min(rest, BUCKET))
        rest -= sizes[-1]
    return sizes


def fit(sizes: list[float], seconds: list[float], ranks: int) -> tuple[float, float]:
    """(α in s, β in bytes/s) of t = 2(p−1)·α + 2(p−1)/p · n/β by least squares on relative error, so that every
    size counts alike (absolute error would leave the small sizes, which set α, to the largest)."""
    n, t = np.asarray(sizes, float), np.asarray(seconds, float)
    design = np.stack([np.full_like(n, 2 * (ranks - 1)), 2 * (ranks - 1) / ranks * n], axis=1)
    (alpha, inverse_beta), *_ = np.linalg.lstsq(design / t[:, None], np.ones_like(t), rcond=None)
    if inverse_beta <= 0:
        raise UserError("the all-reduce times do not grow with size; rerun on a quieter machine")
    return max(float(alpha), 0.0), float(1 / inverse_beta)


def save(path: Path, latency: float, bandwidth: float, **extra: object) -> None:
    """The fitted model as JSON, for `largebatch plan --gpus … --network PATH`."""
    path.write_text(
        json.dumps({"latency_s": latency, "bandwidth_Bps": bandwidth, **extra}, indent=2) + "\n"
    )


def load(path: Path) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) from a JSON `save` wrote (`largebatch bench comm --out`)."""
    try:
        data = json.loads(Path(path).read_text())
        return float(data["latency_s"]), float(data["bandwidth_Bps"])
    except FileNotFoundError:
        raise UserError(
            f"--network {path}: no such file; write one with largebatch bench comm --out {path}"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"--network {path} is not a network fit (JSON with latency_s and bandwidth_Bps); "
            f"write one with largebatch bench comm --out FILE"
        ) from None
