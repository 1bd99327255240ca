"""A finished run leaves no gloo thread behind: teardown really destroys the process group.

A group that outlives teardown keeps its gloo worker threads into interpreter shutdown, where one that drops a
finished collective's tensor needs the GIL, is made to exit, and aborts the process after the run succeeded
("terminate called without an active exception"). torch.distributed.nn's `group=group.WORLD` defaults held the
group when first imported after init (DDP imports it); dist.init imports it first.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import ROOT, torchrun

WORKER = """
import os
import pathlib
import sys

from largebatch import cli

code = cli.main(sys.argv[1:])
names = [p.read_text().strip() for p in pathlib.Path("/proc/self/task").glob("*/comm")]
left = sum(name.startswith(("pt_gloo", "gloo")) for name in names)
os.write(1, f"exit {code} gloo threads left: {left}\\n".encode())  # one write: the two ranks share the pipe
"""


def test_a_finished_training_run_leaves_no_gloo_threads(tmp_path: Path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result = subprocess.run(
        [
            *torchrun(2),
            str(script),
            "train",
            f"run.dir={tmp_path}",
            "data.size=256",
            "data.shape=[8]",
            "model.width=16",
            "batch.global_size=16",
            "train.steps=3",
            "logging.progress=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("exit 0 gloo threads left: 0") == 2, (
        result.stdout + result.stderr[-2000:]
    )
