"""Stress the start and exit of tiny gloo jobs on 127.0.0.1 beside busy CPU hogs.

Hunts rare failures such as a rank aborting with "terminate called without an active exception" after `done`:
runs `--runs` 2-process torchrun jobs and `--agents-runs` jobs of two torchrun agents × 1 process
(launch/multinode.sh, static rendezvous), prints one line per run and a count of failures per kind, keeps
the logs of failed runs, and exits 1 if any run failed.

    .venv/bin/python tools/stress.py --runs 50 --agents-runs 20 --hogs 2
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = [
    "data.size=512",
    "data.shape=[16]",
    "model.width=32",
    "batch.global_size=32",
    "train.steps=10",
    "logging.progress=false",
]
LAUNCH_ENV = (
    "NNODES",
    "NODE_RANK",
    "NPROC",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RDZV",
    "RDZV_ID",
    "MAX_RESTARTS",
)


def _free_port() -> int:
    """A free loopback port below the ephemeral range (as tests/test_multinode.py picks it)."""
    while True:
        port = random.randrange(20000, 29000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` in its own process group (so a timeout can stop its workers too), stdout+stderr to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process group that `proc` leads, if it is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> int:
    """Wait until all exit (0), one fails (its exit code; the rest are killed) or `timeout` passes (124)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or None not in codes:
                return failed[0] if failed else 0
            time.sleep(0.1)
        return 124
    finally:
        for proc in procs:
            _stop(proc)


def _env() -> dict[str, str]:
    """This environment without launch variables (the launchers set the thread count)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and k != "OMP_NUM_THREADS"}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}


def _single(work: Path, timeout: float) -> tuple[int, list[Path]]:
    """One torchrun agent with 2 processes; its exit code and log."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "127.0.0.1:0",
        "-m",
        "largebatch",
        "train",
        *OVERRIDES,
        f"run.dir={work / 'run'}",
    ]
    log = work / "torchrun.log"
    return _wait_all([_start(cmd, log, _env())], timeout), [log]


def _agents(work: Path, timeout: float) -> tuple[int, list[Path]]:
    """Two torchrun agents × 1 process (static rendezvous); the first non-zero exit code and both logs."""
    config = work / "config.yaml"
    config.write_text("logging: {progress: false}\n")
    env = {
        **_env(),
        "NNODES": "2",
        "NPROC": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "RDZV": "static",
    }
    logs = [work / f"node{rank}.log" for rank in range(2)]
    cmd = [
        str(ROOT / "launch" / "multinode.sh"),
        str(config),
        *OVERRIDES,
        f"run.dir={work / 'run'}",
    ]
    procs = [_start(cmd, log, {**env, "NODE_RANK": str(rank)}) for rank, log in enumerate(logs)]
    return _wait_all(procs, timeout), logs


def _last_line(logs: list[Path]) -> str:
    """The telling line of failed logs: an abort message, else the last line naming an error, else the last line."""
    lines = [
        line.strip()
        for log in logs
        for line in log.read_text(errors="replace").splitlines()
        if line.strip()
    ]
    for marker in ("terminate called", "Error"):
        flagged = [line for line in lines if marker in line]
        if flagged:
            return flagged[-1][:200]
    return (lines or [""])[-1][:200]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="2-process torchrun jobs")
    parser.add_argument(
        "--agents-runs", type=int, default=20, help="2-agent × 1-process jobs (launch/multinode.sh)"
    )
    parser.add_argument("--hogs", type=int, default=2, help="busy processes beside the jobs")
    parser.add_argument(
        "--timeout", type=float, default=180, help="seconds per run before it counts as failed"
    )
    parser.add_argument(
        "--keep", type=Path, help="folder for the logs of failed runs (default: a new temp folder)"
    )
    args = parser.parse_args()
    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # so that `finally` stops the hogs and the run

    keep = args.keep or Path(tempfile.mkdtemp(prefix="largebatch-stress-"))
    keep.mkdir(parents=True, exist_ok=True)
    print(f"logs of failed runs go to {keep}", flush=True)
    plan = [("single", _single, i) for i in range(args.runs)]
    plan += [("agents", _agents, i) for i in range(args.agents_runs)]
    failures = {"single": 0, "agents": 0}
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.hogs)]
    try:
        for kind, run, index in plan:
            with tempfile.TemporaryDirectory(prefix=f"stress-{kind}-") as tmp:
                start = time.monotonic()
                code, logs = run(Path(tmp), args.timeout)
                line = f"{kind} {index} exit {code} {time.monotonic() - start:.1f}s"
                if code != 0:
                    failures[kind] += 1
                    for log in logs:
                        (keep / f"{kind}-{index}-{log.name}").write_bytes(log.read_bytes())
                    line += f" | {_last_line(logs)}"
                print(line, flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    print(
        f"failed: single {failures['single']}/{args.runs}, agents {failures['agents']}/{args.agents_runs}"
    )
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
