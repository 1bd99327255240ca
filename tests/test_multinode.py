"""Multi-node launch on one machine: two torchrun agents on loopback train exactly like one agent with two processes."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, metrics, train

MULTINODE = ROOT / "launch" / "multinode.sh"
SMALL = """\
run: {threads: 1}
data: {name: synthetic, size: 512, shape: [16]}
model: {name: mlp, width: 32}
batch: {global_size: 16}
optim: {lr: 0.05, scaling: none}
train: {steps: 20, log_every: 1}
logging: {progress: false}
"""
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
    """A free port below the ephemeral range, so that no other process's outgoing or port-0 socket takes it
    in the seconds between this check and the launcher binding it."""
    while True:
        port = random.randrange(20000, 29000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def _multinode(
    args: list[str], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **env: str
) -> subprocess.Popen:
    """launch/multinode.sh ARGS with exactly the launch variables given (none leak in from the caller)."""
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    full_env.update(PYTHON=sys.executable, PYTHONUNBUFFERED="1", **env)
    return subprocess.Popen(
        [str(MULTINODE), *args], env=full_env, cwd=ROOT, text=True, stdout=stdout, stderr=stderr
    )


def _two_agents(config: Path, run_dir: Path, rdzv: str, timeout: float = 120) -> dict:
    """Start both nodes of a 2-node × 1-process job on 127.0.0.1 and return summary.json; if one agent fails,
    the other is stopped at once and the test fails with both outputs."""
    port = str(_free_port())
    run_dir.mkdir(parents=True)
    logs = [(run_dir / f"node{rank}.log").open("w+") for rank in range(2)]
    agents = [
        _multinode(
            [str(config), f"run.dir={run_dir}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            NNODES="2",
            NPROC="1",
            NODE_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            RDZV=rdzv,
            RDZV_ID=f"test-{port}",
        )
        for rank, log in enumerate(logs)
    ]
    deadline = time.monotonic() + timeout
    try:
        while any(a.poll() is None for a in agents) and all(a.poll() in (None, 0) for a in agents):
            if time.monotonic() > deadline:
                break  # both killed below; their exit codes and outputs fail the test
            time.sleep(0.2)
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
        outputs = [log.seek(0) or log.read() for log in logs]
        for log in logs:
            log.close()
    for rank, (agent, output) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, (
            f"node {rank} exit {agent.returncode} (port {port}):\n" + output[-3000:]
        )
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multinode") / "small.yaml"
    path.write_text(SMALL)
    return path


@pytest.fixture(scope="module")
def one_agent(config, tmp_path_factory) -> tuple[dict, list[float]]:
    """The reference: one torchrun agent with 2 processes on the same config."""
    run_dir = tmp_path_factory.mktemp("one_agent")
    summary = train(run_dir, config=str(config), nproc=2)
    return summary, [r["loss"] for r in metrics(run_dir)]


@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_agents_equal_one_agent_with_two_processes(config, one_agent, run_dirs, rdzv):
    run_dir = run_dirs(rdzv)
    summary = _two_agents(config, run_dir, rdzv)
    reference, reference_losses = one_agent
    assert summary["world_size"] == reference["world_size"] == 2
    assert [r["loss"] for r in metrics(run_dir)] == reference_losses
    assert len(reference_losses) == 20
    assert summary["params_sha256"] == reference["params_sha256"]


@pytest.mark.parametrize("missing", ["NNODES", "MASTER_ADDR"])
def test_multinode_without_required_env_is_one_line_exit_2(config, missing):
    env = {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "NPROC": "1"}
    del env[missing]
    agent = _multinode([str(config)], **env)
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 2
    assert (
        err.splitlines() == [err.strip()]
        and missing in err
        and err.startswith("launch/multinode.sh: error:")
    )
    assert out == ""


def test_static_rendezvous_without_node_rank_is_one_line_exit_2(config):
    agent = _multinode([str(config)], NNODES="2", NPROC="1", MASTER_ADDR="127.0.0.1", RDZV="static")
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 2
    assert err.splitlines() == [err.strip()] and "NODE_RANK" in err


def test_multinode_config_mistake_is_one_line_exit_2_before_any_process(config):
    """The plan is checked for the whole world size (2 nodes × 3 processes = 6), which 16 does not divide."""
    agent = _multinode(
        [str(config), "batch.global_size=16"],
        NNODES="2",
        NPROC="3",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
    )
    out, err = agent.communicate(timeout=60)
    assert agent.returncode == 2
    assert (
        err.splitlines() == [err.strip()]
        and err.startswith("largebatch: error:")
        and "world_size=6" in err
    )
    assert out == ""
