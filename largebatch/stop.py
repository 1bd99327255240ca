"""Stopping together: a signal (preemption, Ctrl-C) or a failed write on rank 0 stops every rank at one step boundary.

Slurm, Kubernetes and torchrun's agent send SIGTERM; a terminal sends SIGINT. Either is only noted here;
the trainer acts on it at the next step boundary, after every rank has agreed (one small all-reduce per step
that also carries the loss), so that all ranks stop after the same step, write one checkpoint and exit with
`128 + signal` (143 for SIGTERM, 130 for SIGINT). A write that fails on any rank (full disk, permissions),
whatever type torch.save, torch.distributed.checkpoint or DeepSpeed raise it as, is agreed the same way: every
rank stops with the failing rank's reason, which rank 0 prints as the one line.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

from largebatch.dist import all_reduce_sum
from largebatch.errors import TrainingStopped

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlags:
    """What this rank has seen since the last agreement: a signal, or a failed write under `run_dir`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
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
        """Run a write; any failure becomes a fault that every rank acts on at the next agreement (a full disk
        reaches us as OSError, as torch.save's RuntimeError, or wrapped in a CheckpointException)."""
        try:
            yield
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        # BaseException: torch.distributed.checkpoint's CheckpointException is not an Exception.
        except BaseException as exc:
            self.fault = self.fault or (
                f"cannot write {what}: {_reason(exc, self.run_dir)}; "
                f"free space or fix the permissions of run.dir"
            )

    def values(self) -> list[float]:
        """[SIGTERM seen, SIGINT seen, fault] as floats, to be summed over ranks with the step's loss."""
        return [
            float(self.signum == signal.SIGTERM),
            float(self.signum == signal.SIGINT),
            float(self.fault is not None),
        ]

    def agree(self, summed: list[float]) -> int:
        """Raise if any rank saw a fault; else the signal to stop on (SIGTERM over SIGINT), or 0. `summed`: `values`
        summed over ranks."""
        term, interrupt, fault = summed
        if fault:
            raise TrainingStopped(_first_fault(self.fault))
        return signal.SIGTERM if term else signal.SIGINT if interrupt else 0

    def agree_now(self, device: torch.device) -> int:
        """`agree` outside a step (before the first, after the last): one collective on its own."""
        return self.agree(all_reduce_sum(torch.tensor(self.values(), device=device)).tolist())


def _first_fault(mine: str | None) -> str:
    """The lowest faulty rank's message, on every rank (collective: every rank saw the same fault count)."""
    if not dist.is_initialized():
        return mine or "a write failed"
    faults: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(faults, mine)
    return next(f for f in faults if f is not None)


def _reason(exc: BaseException, run_dir: Path) -> str:
    """What went wrong, in a few words: the errno's text of the OSError behind `exc` if there is one (torch.save's
    "unexpected pos" RuntimeError hides it in its context, torch.distributed.checkpoint in its failures), else
    `exc`'s first line and the free space left where run.dir is (C++ writers lose the errno: "basic_ios::clear")."""
    seen, todo = set(), [exc]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        todo += [error.__cause__, error.__context__]
        todo += [e for e in getattr(error, "failures", {}).values() if isinstance(e, BaseException)]
        todo += [e[0] for e in getattr(error, "failures", {}).values() if isinstance(e, tuple)]
    failures = list(getattr(exc, "failures", {}).values())
    root = failures[0][0] if failures and isinstance(failures[0], tuple) else exc
    text = (str(root).strip().splitlines() or [type(root).__name__])[0]
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if existing is None:
        return text
    return f"{text} ({shutil.disk_usage(existing).free // 1024} KiB free on run.dir's filesystem)"
