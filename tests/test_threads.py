"""Threads by one rule, whatever the launcher: run.threads, else OMP_NUM_THREADS, else cores ÷ processes per node."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ROOT

from largebatch import dist

CORES = len(os.sched_getaffinity(0))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_run_threads_wins_over_the_environment(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert dist.threads(5) == 5


def test_omp_num_threads_set_by_the_caller_is_kept(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert dist.threads() == 3


def test_otherwise_the_cores_are_shared_by_the_processes_of_this_node(clean_env):
    assert dist.threads() == CORES
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun
    assert dist.threads() == max(1, CORES // 2)
    clean_env.delenv("LOCAL_WORLD_SIZE")
    clean_env.setenv("LOCAL_SIZE", str(CORES * 4))  # DeepSpeed's launcher
    assert dist.threads() == 1


def _launcher_threads(env: dict[str, str]) -> str:
    script = 'source launch/common.sh; export_threads 2; echo "$OMP_NUM_THREADS"'
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_every_launch_script_exports_the_same_rule():
    assert _launcher_threads({}) == str(max(1, CORES // 2))
    assert _launcher_threads({"OMP_NUM_THREADS": "3"}) == "3"
