"""`largebatch sweep`: trainings stopped at a held-out target, the table, the fit of steps vs examples, the plot, and
a sweep started again keeping the points it has."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import ROOT, cli, cli_in_process

from largebatch.sweep import fit

LINREG = str(ROOT / "tests" / "tasks" / "linreg.yaml")
POINT = (
    "data.args={sigma: 1.0, size: 4096}",
    "optim.lr=0.1",
    "optim.reference_batch=64",
    "optim.scaling=linear",
    "batch.micro_size=8",
    "train.steps=200",
    "train.eval_every=2",
)


def test_the_fit_recovers_s_min_e_min_and_the_critical_batch_of_exact_data():
    batches = [16, 32, 64, 128, 256, 512]
    result = fit(batches, [100 + 6400 / b for b in batches])
    assert result.s_min == pytest.approx(100) and result.e_min == pytest.approx(6400)
    assert result.b_crit == pytest.approx(64) and result.b_crit_err == pytest.approx(0, abs=1e-6)
    assert result.b_20 == pytest.approx(1.2 * 16 + 0.2 * 64)
    assert fit([64, 128], [10, 5]) is None  # perfect scaling: no S_min > 0 to find


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sweep") / "linreg"
    result = cli(
        "sweep",
        "--config",
        LINREG,
        *POINT,
        "--global-sizes",
        "16,64,256",
        "--target",
        "eval/loss=0.55",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_three_points_write_the_table_and_a_fit(swept: tuple[Path, str]):
    out, stdout = swept
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [int(r["global_batch"]) for r in rows] == [16, 64, 256]
    assert all(
        r["reached"] == "True" and r["metric"] == "eval/loss" and float(r["final"]) <= 0.55
        for r in rows
    )
    steps = [int(r["steps"]) for r in rows]
    assert steps[0] > steps[1] > steps[2] and all(
        int(r["examples"]) == int(r["steps"]) * int(r["global_batch"]) for r in rows
    )
    for r in rows:  # the run stopped at the eval step that first reached the target
        records = [
            json.loads(line)
            for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        ]
        evals = [m for m in records if "eval/loss" in m]
        assert evals[-1]["step"] == int(r["steps"]) == records[-1]["step"]
        assert all(m["eval/loss"] > 0.55 for m in evals[:-1])
        assert float(r["noise_scale"]) > 0
    result = json.loads((out / "sweep.json").read_text())
    assert (
        result["fit"]["s_min"] > 0 and result["fit"]["b_crit"] > 0 and result["fit"]["points"] == 3
    )
    assert "B_crit" in stdout and "measured noise scale" in stdout


def test_a_sweep_started_again_keeps_its_points_and_the_report_draws_it(
    swept: tuple[Path, str], tmp_path: Path
):
    out, _ = swept
    before = (out / "sweep.json").read_text()
    again = cli_in_process(
        "sweep",
        "--config",
        LINREG,
        *POINT,
        "--global-sizes",
        "16,64,256",
        "--target",
        "eval/loss=0.55",
        "--out",
        str(out),
    )
    assert again.returncode == 0 and again.stdout.count("done before, kept") == 3
    assert json.loads((out / "sweep.json").read_text()) == json.loads(before)
    report = cli_in_process("report", str(out), "--out", str(tmp_path))
    assert report.returncode == 0 and (tmp_path / "linreg.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "args, message",
    [
        (("--global-sizes", "64,x"), "--global-sizes=64,x"),
        (("--global-sizes", "64", "--target", "accuracy>0.9"), "eval/<metric>=<number>"),
        (("--global-sizes", "100000"), "larger than the training set"),
    ],
)
def test_a_bad_sweep_is_one_line_and_exit_2_before_any_training(
    args: tuple[str, ...], message: str, tmp_path: Path
):
    result = cli_in_process("sweep", "--config", LINREG, *POINT, *args, "--out", str(tmp_path))
    assert (
        result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1
    )
    assert not (tmp_path / "points").exists()


def test_the_report_draws_budget_sweeps_together_as_metric_vs_batch(tmp_path: Path):
    """Sweeps without a target (each point ran its budget): one plot of the final metric against the global batch."""
    for name, finals in (("warmup", [0.99, 0.98, 0.9]), ("no-warmup", [0.99, 0.95, 0.7])):
        points = [
            {
                "global_batch": b,
                "lr": None,
                "optimizer": None,
                "metric": "eval/accuracy",
                "final": f,
                "reached": False,
                "run_dir": f"{name}/b{b}",
            }
            for b, f in zip([64, 256, 1024], finals)
        ]
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(
            json.dumps(
                {"target": None, "points": points, "fit": None, "best": [], "noise_scale": None}
            )
        )
    result = cli_in_process(
        "report",
        str(tmp_path / "warmup"),
        str(tmp_path / "no-warmup"),
        "--out",
        str(tmp_path / "out"),
    )
    assert (
        result.returncode == 0
        and result.stdout.strip() == f"wrote {tmp_path / 'out' / 'sweeps.png'}"
    )
    assert (tmp_path / "out" / "sweeps.png").stat().st_size > 10_000


def test_a_target_the_evaluation_does_not_give_is_a_warning_and_the_run_goes_on(tmp_path: Path):
    result = cli(
        "train",
        "--config",
        LINREG,
        "train.steps=10",
        "train.eval_every=5",
        "train.noise_scale=false",
        "train.target=eval/accuracy=0.9",
        f"run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    assert (
        "the evaluation gives eval/loss, not eval/accuracy, so the run will not stop early"
        in result.stderr
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["target"]["reached"] is None
