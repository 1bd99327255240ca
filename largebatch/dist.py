"""Process-group setup from the launcher's environment (torchrun, deepspeed), or a single process without one."""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist

from largebatch.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_age_s() -> float | None:
    """Seconds since the operating system started this process (Linux: /proc/self/stat's start time against the
    boot clock, 10 ms resolution), or None elsewhere: start-up time measured from before the interpreter ran."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf(
            "SC_CLK_TCK"
        )  # field 22; fields counted from the 3rd
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, AttributeError, ValueError, IndexError):
        return None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(
            f"environment variable {name}={value!r} must be an integer; check the launcher"
        ) from None


def torchrun_command(nproc: int, *options: str) -> list[str]:
    """torchrun for `nproc` processes on this machine (its `options`, then the rendezvous on a free port of 127.0.0.1,
    never another address); the caller appends `-m MODULE ARGS`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        *options,
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
    ]


def from_env() -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE as torchrun and deepspeed set them; no process group yet."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"launcher environment has RANK={rank} outside WORLD_SIZE={world_size}; check the launcher"
        )
    if world_size > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError(
            "WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun (see launch/torchrun.sh)"
        )
    if torch.cuda.is_available():
        return DistInfo(
            rank,
            local_rank,
            world_size,
            torch.device("cuda", local_rank % torch.cuda.device_count()),
        )
    return DistInfo(rank, local_rank, world_size, torch.device("cpu"))


def threads(configured: int | None = None, local_processes: int | None = None) -> int:
    """CPU threads per process, by one rule for every launcher: `run.threads` if set, else OMP_NUM_THREADS if the
    caller set it, else the usable cores ÷ processes on this node (at least 1).

    Floating-point results can change with the thread count, so a job's numbers must not depend on which
    launcher started it (torchrun sets OMP_NUM_THREADS=1 only for 2+ processes per node; DeepSpeed never does).
    """
    if configured is not None:
        return configured
    if os.environ.get("OMP_NUM_THREADS"):
        value = _env_int("OMP_NUM_THREADS", 1)
        if value < 1:
            raise UserError(
                f"OMP_NUM_THREADS={value} must be a positive integer; unset it or set run.threads"
            )
        return value
    local = local_processes or _env_int("LOCAL_WORLD_SIZE", _env_int("LOCAL_SIZE", 1))
    return max(1, len(os.sched_getaffinity(0)) // max(local, 1))


def init(info: DistInfo, always: bool = False) -> None:
    """Join the process group: NCCL on CUDA, gloo on CPU. A single process needs none, unless `always` (then it is
    a group of one, over an in-process store)."""
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    if info.world_size > 1 or always:
        # Before the group exists: torch.distributed.nn.functional declares `group=group.WORLD` defaults, which
        # bind the default group itself if it is first imported after init (DDP's constructor imports it), and
        # those references would keep the group and its gloo threads alive past teardown (see teardown).
        from torch.distributed import nn as _  # noqa: F401  (not `import torch.distributed.nn`: that makes `torch` local)

        backend = "nccl" if info.device.type == "cuda" else "gloo"
        store = _store(info) if info.world_size > 1 else dist.HashStore()
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size)


def _store(info: DistInfo) -> dist.Store:
    """The rendezvous store, its keys prefixed by torchrun's restart count.

    After a restart (`--max-restarts`) torchrun's c10d agent store can still hold the previous
    attempt's process-group keys; without the prefix a restarted rank may read a dead peer's
    address and fail with "connectFullMesh ... Connection refused".
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        _env_int("MASTER_PORT", 29500),
        info.world_size,
        is_master=not agent_store and info.rank == 0,
        multi_tenant=not agent_store,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(
        f"largebatch/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def teardown() -> None:
    """Barrier (every rank is past its last collective), then destroy the process group while the interpreter
    is fully alive.

    Dropping the last reference to a gloo group joins its worker threads (torch releases the GIL for that). A
    group that outlives this (still referenced, e.g. by a live DDP model) keeps them running into interpreter
    finalization, where a worker that drops a finished collective's Python-owned tensor needs the GIL, is made
    to exit, and aborts the process after the run succeeded: "terminate called without an active exception".
    The torch.distributed.nn import in `init` removes the references torch itself would keep; collecting garbage
    first frees a finished run's objects that only a reference cycle keeps alive (a model, its DDP wrapper and the
    hooks or bound methods that point back at them), so no DDP model holds the group past this point.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def broadcast_from_main(value: T) -> T:
    """Rank 0's `value` on every rank (picklable; a no-op in a single process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics); a no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def several_ranks(group: dist.ProcessGroup | None = None) -> bool:
    """A process group of 2 or more ranks is joined (`group`, else the default one), so a collective over it has
    work to do: a group of one (FSDP and DeepSpeed on one process join one) still pays gloo's call, 0.2 ms."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (a no-op on one rank)."""
    if several_ranks():
        dist.all_reduce(tensor)
    return tensor
