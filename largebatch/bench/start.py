"""Start-up time: seconds from `largebatch train` to its first finished step, against `python -c 'import torch'`.

Every time is the process's age when it is done, measured from the moment the operating system started it
(`dist.process_age_s`, Linux), so the interpreter's own start counts on every side: the run's `first_step_s`
(summary.json), a process that imports torch, and one that also takes one SGD step on a linear layer (torch.optim's
first call imports torch._dynamo: the floor of any training loop on torch.optim). They alternate, `--repeats` times
each, after one warm-up run; medians and spreads are printed, and the first step's distance from `import torch`
(goal: ≤ 0.4 s). The run is the config (default configs/quickstart.yaml) on one process, stopped after one step.
"""

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from largebatch import bench
from largebatch.errors import UserError

AGE = "from largebatch.dist import process_age_s; print(process_age_s())"
BASELINES = {
    "python -c 'import torch'": "import torch",
    "import torch + 1 SGD step": "import torch; m = torch.nn.Linear(2, 2); o = torch.optim.SGD(m.parameters()); "
    "m(torch.ones(1, 2)).sum().backward(); o.step()",
}
"""Children that print their age when done: the goal's baseline, and the floor of any loop on torch.optim (whose
first call imports torch._dynamo)."""
GOAL_S = 0.4
"""The first step may come this much later than `import torch` ends."""


def baseline_s(code: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; {AGE}"], capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def first_step_s(config: str, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "largebatch", "train", "--config", config]
        command += [f"run.dir={tmp}", "train.epochs=null", "train.steps=1"]
        command += ["schedule.warmup_epochs=null", "schedule.warmup_steps=0", "train.eval_every=0"]
        result = subprocess.run([*command, *overrides], capture_output=True, text=True)
        if result.returncode:
            raise UserError(f"the run failed: {result.stderr.strip().splitlines()[-1]}")
        return json.loads((Path(tmp) / "summary.json").read_text())["first_step_s"]


def spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"
    )


def main(argv: list[str]) -> int:
    parser = bench.parser("start", __doc__)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the config to start")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each, alternating")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise UserError(f"--repeats={args.repeats} must be at least 1")
    if sys.platform != "linux":
        raise UserError("bench start reads process start times from /proc: run it on Linux")
    first_step_s(
        args.config, args.overrides
    )  # warms the file cache (and any extension build) for both sides
    times: dict[str, list[float]] = {
        name: [] for name in [*BASELINES, "largebatch train, 1st step"]
    }
    for _ in range(args.repeats):
        for name, code in BASELINES.items():
            times[name].append(baseline_s(code))
        times["largebatch train, 1st step"].append(first_step_s(args.config, args.overrides))
    for name, values in times.items():
        print(f"{name:28} {spread(values)}")
    firsts, imports = times["largebatch train, 1st step"], times["python -c 'import torch'"]
    over = statistics.median(firsts) - statistics.median(imports)
    verdict = "meets" if over <= GOAL_S else "misses"
    print(f"first step - import torch: {over:+.2f} s ({verdict} the goal of +{GOAL_S} s)")
    return 0
