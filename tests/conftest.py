"""Shared helpers: run the real CLI, alone or under real torchrun (gloo, loopback)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Every test process runs one thread per process, whatever the caller exported: results (which can change with the
# thread count) then do not depend on the caller or the core count, and a loaded machine is not oversubscribed
# (2 threads per process beside CPU hogs made single steps up to 40x slower in OpenMP barriers). Set before torch
# is imported, so it holds in this process too. tests/test_threads.py checks the rule itself.
os.environ["OMP_NUM_THREADS"] = "1"

HEAVIEST_FIRST = (
    "test_user_data.py",
    "test_full_disk.py",
    "test_deepspeed.py",
    "test_noise.py",
    "test_fsdp.py",
    "test_multinode.py",
    "test_launch.py",
    "test_find_batch.py",
    "test_checkpoint.py",
    "test_muon.py",
    "test_train.py",
    "test_fsdp_features.py",
    "test_compile.py",
    "test_stop.py",
    "test_fsdp_autobatch.py",
    "test_feature_matrix.py",
)
"""The files that take longest (pytest --durations), in that order. pytest-xdist hands whole files to its workers
in collection order (pyproject's addopts), so these go first and the run ends with short files on both workers."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the heaviest files first, the rest in their usual order (the sort is stable)."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Under pytest-xdist, a test marked `alone` (it times something that another worker's load would distort) runs
    while no other test does: it holds the run's lock file exclusively, every other test holds it shared, from its
    fixtures' setup to their teardown."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return (yield)
    with open(Path(tempfile.gettempdir()) / f"largebatch-tests-{run}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker per core, at most 8 (each may start a 2-process torchrun job, and every process holds
    torch in memory)."""
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def torchrun(nproc: int, *options: str) -> list[str]:
    """The tests' torchrun command line, the product's: `nproc` processes on 127.0.0.1, rendezvous on a free port."""
    from largebatch.dist import (
        torchrun_command,
    )  # here: torch is imported after OMP_NUM_THREADS is set

    return torchrun_command(nproc, *options)


def cli(
    *args: str, nproc: int = 1, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """`python -m largebatch ARGS`, or the same under torchrun with `nproc` processes on 127.0.0.1."""
    launcher = [sys.executable, "-m", "largebatch"]
    if nproc > 1:
        launcher = [
            *torchrun(nproc),
            "-m",
            "largebatch",
        ]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [*launcher, *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT
    )


def cli_in_process(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`largebatch ARGS` run in this process, for user errors (which end before any process group or training starts)
    and one-process trainings: it saves each the 3 s of a new interpreter importing torch. `cli` covers the real
    process and its exit."""
    import torch

    from largebatch.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    # what a run sets for its process, restored for the tests that run in this one after it
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with (
            contextlib.chdir(ROOT),  # as `cli`'s subprocess: relative paths are the repository's
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = main(list(args))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        torch.set_num_threads(threads)
        if torch.are_deterministic_algorithms_enabled() != deterministic:
            torch.use_deterministic_algorithms(deterministic)  # imports torch._inductor: 2 s
        torch.random.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
    return subprocess.CompletedProcess(["largebatch", *args], code, out.getvalue(), err.getvalue())


def train(
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    config: str | None = None,
    own_process: bool = False,
) -> dict:
    """Train to completion and return summary.json; fails the test with the output if the run fails. Several
    processes train under real torchrun; one trains in this process (`cli_in_process`: no interpreter start, torch
    import or torch._dynamo import, ≈ 3.5 s of CPU a run) unless `own_process` (what only a process shows, such as
    its age) or on DeepSpeed, whose communication layer is global to the process and outlives the process group."""
    args = [
        "train",
        *(["--config", config] if config else []),
        f"run.dir={run_dir}",
        "logging.progress=false",
        *overrides,
    ]
    here = nproc == 1 and not own_process and not _on_deepspeed(config, overrides)
    result = cli_in_process(*args) if here else cli(*args, nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "summary.json").read_text())


def _on_deepspeed(config: str | None, args: tuple[str, ...]) -> bool:
    """Whether these CLI arguments (`--config=FILE` among them, or `config`) train on DeepSpeed."""
    from largebatch import config as configs

    files = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    overrides = [a for a in args if not a.startswith("--config=")]
    return configs.load(config or next(iter(files), None), overrides).engine.name == "deepspeed"


ONE_JOB = """
import json, os, sys
from largebatch import config, dist, job, trainer
info = dist.from_env()
dist.init(info, always=True)
for run_dir, (args, env) in json.loads(sys.argv[1]).items():
    os.environ.update(env)  # while this run trains (test seams read it when the trainer is built)
    if info.rank == 0:
        print("@@run", run_dir, file=sys.stderr, flush=True)  # MARK
    path = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
    cfg = config.load(path, [a for a in args if not a.startswith("--config=")] + [f"run.dir={run_dir}"])
    trainer.fit(job.prepare(cfg, info.world_size), info)
    for key in env:
        del os.environ[key]
dist.teardown()
"""
MARK = "@@run "
"""What ONE_JOB's rank 0 writes to stderr, with the run directory, before each run: where each run's stderr starts."""


def train_in_one_job(
    base: Path,
    runs: dict[str, tuple[str, ...]],
    nproc: int = 2,
    env: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """Train each of `runs` ({run name: CLI arguments, `--config=FILE` included}) into `base/<name>`, one after
    another in the same torchrun job: many short trainings cost one interpreter start and one import. `env`: {run
    name: environment variables set while that run trains}. On one process (DeepSpeed aside, see `train`) they run in
    this process, as `train` does. Returns each run's stderr (under torchrun: what the job wrote while it trained)."""
    env = {name: (env or {}).get(name, {}) for name in runs}
    if nproc == 1 and not any(_on_deepspeed(None, args) for args in runs.values()):
        errors = {}
        for name, args in runs.items():
            done = cli_in_process("train", *args, f"run.dir={base / name}", env=env[name])
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            errors[name] = done.stderr
        return errors
    script = base / "runs.py"
    script.write_text(ONE_JOB)
    table = json.dumps({str(base / name): (args, env[name]) for name, args in runs.items()})
    done = subprocess.run(
        [*torchrun(nproc), str(script), table],
        capture_output=True,
        text=True,
        cwd=ROOT / "examples",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    parts = (part.split("\n", 1) for part in done.stderr.split(MARK)[1:])
    return {Path(head).name: "".join(rest) for head, *rest in parts}


def relative(ours: list[dict], reference: list[dict], key: str) -> float:
    """The largest relative difference of `key` between two runs' metrics, step by step (same steps logged)."""
    assert [m["step"] for m in ours] == [m["step"] for m in reference]
    return max(abs(a[key] - b[key]) / abs(b[key]) for a, b in zip(ours, reference))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_resumed(full: Path, resumed: Path, at: int, end: int, rtol: float, exact: bool) -> None:
    """`resumed`, resumed from `full`'s checkpoint at step `at` of `end`, logs steps at+1..end with `full`'s losses
    within `rtol` (relative) and, if `exact`, ends with `full`'s parameters (params_sha256)."""
    ours = metrics(resumed)
    assert [m["step"] for m in ours] == list(range(at + 1, end + 1))
    assert relative(ours, metrics(full)[at:], "loss") < rtol
    if exact:
        sha = [
            json.loads((run / "summary.json").read_text())["params_sha256"]
            for run in (resumed, full)
        ]
        assert sha[0] == sha[1]


@pytest.fixture
def run_dirs(tmp_path: Path):
    """A fresh run directory per name."""
    return lambda name: tmp_path / name


def kill_one_worker_mid_run(
    run: Path, overrides: tuple[str, ...], after_steps: int, checkpoint: str, timeout: float = 120
) -> str:
    """Train under torchrun (2 processes, --max-restarts 1) and SIGKILL one worker once `after_steps` steps are logged
    and `checkpoint` exists; returns the agent's output after it finished (the test checks its exit code)."""
    import psutil

    command = [
        *torchrun(2, "--max-restarts", "1"),
        "-m",
        "largebatch",
        "train",
        f"run.dir={run}",
        "logging.progress=false",
        *overrides,
    ]
    agent = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed = None
    deadline = time.monotonic() + timeout
    while killed is None and time.monotonic() < deadline and agent.poll() is None:
        done = (
            (run / "metrics.jsonl").read_text().count("\n")
            if (run / "metrics.jsonl").exists()
            else 0
        )
        if done >= after_steps and (run / "checkpoints" / checkpoint).exists():
            workers = psutil.Process(agent.pid).children()
            killed = workers[-1].pid
            workers[-1].send_signal(signal.SIGKILL)
        time.sleep(0.02)
    output, _ = agent.communicate(timeout=300)
    assert killed is not None, "the run finished before the kill; make steps slower"
    assert agent.returncode == 0, output[-3000:]
    assert "resuming from" in output
    return output


def write_tokens(
    path: Path, count: int, vocab: int = 256, dtype: str = "uint16", seed: int = 0
) -> Path:
    """A flat token file as nanoGPT writes it: a repeating pattern with noise, so a model can learn something."""
    rng = np.random.default_rng(seed)
    tokens = (np.arange(count) * 7 + rng.integers(0, 3, count)) % vocab
    tokens.astype(dtype).tofile(path)
    return path


def write_jsonl(path: Path, lines: int, seed: int = 0) -> Path:
    """JSON lines of text from 3 to 40 characters: variable lengths, so batches are padded."""
    rng = np.random.default_rng(seed)
    words = ["large", "batch", "noise", "scale", "warmup", "lamb", "lars", "step"]
    with path.open("w") as f:
        for _ in range(lines):
            text = " ".join(rng.choice(words, int(rng.integers(1, 6))))[:40]
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_tiny_gpt2(folder: Path, vocab: int = 256, positions: int = 64) -> Path:
    """A local Hugging Face GPT-2 config (1 layer, width 32, no dropout): hf:<folder> builds it, nothing downloaded."""
    from transformers import GPT2Config

    GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=32,
        vocab_size=vocab,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    ).save_pretrained(folder)
    return folder


def cli_in_one_process(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """`largebatch ARGS` for each of `commands`, one after another in this process (`cli_in_process`; no DeepSpeed
    runs, see `train`), each with its own exit code, stdout and stderr."""
    return [cli_in_process(*command) for command in commands]
