"""Stopping together: a signal (preemption, Ctrl-C) or a failed write on rank 0 stops every rank at one step boundary.

Slurm, Kubernetes and torchrun's agent send SIGTERM; a terminal sends SIGINT. Either is only noted here;
the trainer acts on it at the next step boundary, after every rank has agreed (one small all-reduce per step
that also carries the loss), so that all ranks stop after the same step, write one checkpoint and exit with
`128 + signal` (143 for SIGTERM, 130 for SIGINT). A write that fails on rank 0 (full disk, permissions) is
agreed the same way, so the other ranks exit with it within a step instead of waiting in a collective.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import torch

from largebatch.dist import all_reduce_sum
from largebatch.errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlags:
    """What this rank has seen since the last agreement: a signal, or (rank 0) a failed write."""

    def __init__(self) -> None:
        self.signum = 0
        self.fault: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Note SIGTERM/SIGINT instead of dying, until `uninstall` (Python handles signals in the main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._note)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run a write; an OSError becomes a fault that every rank acts on at the next agreement."""
        try:
            yield
        except OSError as exc:
            self.fault = (
                self.fault
                or f"cannot write {what}: {exc.strerror or exc}; free space or fix the permissions of run.dir"
            )

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        """[SIGTERM seen, SIGINT seen, fault] as floats, to be summed over ranks with the step's loss."""
        return torch.tensor(
            [self.signum == signal.SIGTERM, self.signum == signal.SIGINT, self.fault is not None],
            dtype=torch.float32,
            device=device,
        )

    def agree(self, summed: torch.Tensor) -> int:
        """Raise if any rank saw a fault; else the signal to stop on (SIGTERM over SIGINT), or 0."""
        term, interrupt, fault = summed.tolist()
        if fault:
            raise TrainingStopped(
                self.fault or "another rank could not write to run.dir (see its message)"
            )
        return signal.SIGTERM if term else signal.SIGINT if interrupt else 0

    def agree_now(self, device: torch.device) -> int:
        """`agree` outside a step (before the first, after the last): one collective on its own."""
        return self.agree(all_reduce_sum(self.as_tensor(device)))
