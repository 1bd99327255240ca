"""The branched critical batch (Merrill et al. 2025): `largebatch cbs` from a checkpoint and train.cbs_every during a
run; it recovers linear regression's known noise scale, writes nothing into the parent run, leaves a run's
trajectory unchanged, and `largebatch report` draws it with the noise scale on one plot."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import ROOT, cli_in_process, train_in_one_job
from test_noise_probe import task_args, write_checkpoint

from largebatch import cbs, report

CONFIG = str(ROOT / "tests/tasks/linreg.yaml")
SIGMA, DELTA = 0.0, 1.0
"""Noise-free linear regression: B_simple = d + 1 = 17 at every w (tr Σ and |G|² are both ∝ |w − w*|²), so the
branches stay at the noise scale of their branch point however far they train (tests/tasks/linreg.py)."""
LR = ("optim.lr=0.19", "optim.reference_batch=4", "optim.scaling=linear")
"""SGD's best LR at the smallest batch, 4, on this quadratic (per step B/(B + B_simple) = 4/21; McCandlish et al.
2018, ε_opt), scaled linearly from there: a run tuned at a small batch."""
SIZES = "4,8,16,32,64,128"
TOLERANCE = 0.5
EXAMPLES = 1024
"""The command's defaults, fixed here before it runs: tolerance 0.5 of the smallest batch's progress, 8 × 128
examples per branch."""


def tree(run_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `run_dir`."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def branch(checkpoint: Path, *options: str, config: str = CONFIG):
    return cli_in_process(
        "cbs",
        "--config",
        config,
        *task_args(SIGMA, DELTA),
        *LR,
        "--checkpoint",
        str(checkpoint),
        *options,
    )


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    """A run directory holding the linear-regression checkpoint the trainer writes (DDP engine, one process)."""
    run_dir = tmp_path_factory.mktemp("parent")
    write_checkpoint(run_dir, SIGMA, DELTA)
    return run_dir


@pytest.fixture(scope="module")
def branched(parent: Path, tmp_path_factory) -> tuple[dict, dict, object]:
    """(the parent's files before, after, the command's result) for `largebatch cbs` at the defaults, with wandb
    configured as the parent would have it."""
    out = tmp_path_factory.mktemp("out") / "cbs.json"
    before = tree(parent)
    result = branch(parent, "logging.wandb=offline", "--global-sizes", SIZES, "--json", str(out))
    assert result.returncode == 0, result.stderr
    return before, tree(parent), result, json.loads(out.read_text())


def test_the_defaults_are_the_ones_this_file_fixes():
    assert cbs.TOLERANCE == TOLERANCE
    assert cbs.default_examples([int(b) for b in SIZES.split(",")]) == EXAMPLES


def test_the_branched_critical_batch_of_linear_regression_is_within_2x_of_b_simple(branched):
    from tasks.linreg import simple_noise_scale

    *_, measured = branched
    true = simple_noise_scale(SIGMA, DELTA)
    assert measured["tolerance"] == TOLERANCE and measured["examples"] == EXAMPLES
    assert true / 2 <= measured["critical_batch"] <= 2 * true
    low, high = measured["interval"]
    assert low <= measured["critical_batch"] < high
    assert len(measured["losses"]) == cbs.REPEATS and measured["step"] == 3


def test_branches_write_nothing_into_the_parent_run(branched, parent: Path):
    before, after, *_ = branched
    assert after == before
    assert not (parent / "wandb").exists() and not (parent / "cbs.jsonl").exists()


def test_each_branch_loss_the_interval_and_the_noise_scale_are_printed(branched):
    *_, result, measured = branched
    out = result.stdout
    for size, loss in zip(measured["sizes"], measured["mean_losses"]):
        assert f"{size:>8} {loss:>13.6g}" in out
    low, high = measured["interval"]
    assert f"critical batch = {measured['critical_batch']}:" in out
    assert f"interval [{low}, {high}] over repeats" in out
    assert "keeps the parameters, optimizer moments" in out
    assert "noise scale: the checkpoint has none" in out


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (("--global-sizes", "4,8"), "does not exist"),
        (
            ("--global-sizes", "8", "batch.micro_size=8"),
            "needs at least two positive global batches",
        ),
        (
            ("--global-sizes", "4,8,16", "batch.micro_size=8"),
            "4 not a multiple of world × micro-batch = 8",
        ),
        (("--global-sizes", "8,16", "--examples", "100"), "is not a multiple of every size (16)"),
        (
            ("--global-sizes", "8,16", "--tolerance", "1.5"),
            "--tolerance=1.5 must be between 0 and 1",
        ),
        (("--global-sizes", "8,x"), "must be comma-separated integers"),
    ],
)
def test_a_bad_request_is_one_line(parent: Path, options: tuple[str, ...], error: str):
    checkpoint = parent / "nowhere" if error == "does not exist" else parent
    result = branch(checkpoint, *options)
    assert result.returncode == 2
    assert result.stderr.startswith("largebatch: error: ") and result.stderr.count("\n") == 1
    assert error in result.stderr


RUN = (
    f"--config={CONFIG}",
    "data.args={sigma: 2.0}",
    "optim.lr=0.005",
    "optim.reference_batch=4",
    "optim.scaling=linear",
    "batch.global_size=16",
    "batch.micro_size=4",
    "train.steps=8",
    "train.log_every=1",
    "train.noise_scale=true",
    "train.noise_every=1",
)
"""A noisy regression (B_simple = 81 at the start) still far from its noise floor after 8 steps of 16."""
MEASURED = ("train.cbs_every=4", "train.cbs_sizes=[8,16,32]", "train.cbs_examples=64")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The run with and without train.cbs_every on one process, trained in this one (no interpreter to start)."""
    from largebatch import api, config

    base = tmp_path_factory.mktemp("cbs_every_1")
    for name, args in {"plain": RUN, "measured": (*RUN, *MEASURED)}.items():
        api.run(
            config.load(CONFIG, [*args[1:], f"run.dir={base / name}", "logging.progress=false"])
        )
    return base


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """The run with and without train.cbs_every in one torchrun job of 2 processes."""
    base = tmp_path_factory.mktemp("cbs_every_2")
    train_in_one_job(base, {"plain": RUN, "measured": (*RUN, *MEASURED)})
    return base


@pytest.mark.parametrize("world", ["one_process", "two_processes"])
def test_cbs_every_leaves_the_trajectory_unchanged_and_writes_cbs_jsonl(request, world: str):
    runs = request.getfixturevalue(world)
    plain, measured = (
        json.loads((runs / n / "summary.json").read_text()) for n in ("plain", "measured")
    )
    assert measured["params_sha256"] == plain["params_sha256"]
    lines = [json.loads(x) for x in (runs / "measured" / cbs.RECORD).read_text().splitlines()]
    assert [line["step"] for line in lines] == [4, 8]
    assert [line["samples"] for line in lines] == [64, 128]
    for line in lines:
        assert line["sizes"] == [8, 16, 32] and line["examples"] == 64
        assert len(line["losses"]) == 1 and len(line["losses"][0]) == 3
        assert line["critical_batch"] in (8, 16, 32) and line["gns"] > 0
    assert not (runs / "plain" / cbs.RECORD).exists()


def test_report_draws_the_branched_critical_batch_and_the_noise_scale_on_one_plot(
    two_processes: Path, tmp_path: Path
):
    runs = two_processes
    written = report.write_report([runs / "measured"], tmp_path)
    png = tmp_path / "critical_batch.png"
    assert png in written and png.read_bytes().startswith(b"\x89PNG")
    (ax,) = report.critical_batch_panel([report.load_run(runs / "measured")]).axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("branched critical batch" in label for label in labels)
    assert any("noise scale" in label for label in labels)
    assert len(ax.containers) == 1 and len(ax.containers[0].lines[0].get_xdata()) == 2


def test_cbs_sizes_without_cbs_every_is_one_line():
    result = cli_in_process("plan", "--config", CONFIG, "train.cbs_sizes=[8,16]")
    assert result.returncode == 2
    assert result.stderr == (
        "largebatch: error: train.cbs_sizes and train.cbs_examples set up train.cbs_every's measurement: set "
        "train.cbs_every (steps between measurements), or drop them\n"
    )


def test_the_critical_batch_is_the_largest_size_keeping_the_tolerated_share_of_progress():
    measured = cbs.Measurement(
        sizes=[8, 16, 32, 64],
        examples=64,
        tolerance=0.5,
        start_loss=2.0,
        losses=[
            [1.0, 1.2, 1.6, 1.9],
            [1.0, 1.4, 1.4, 1.9],
        ],  # progress 100 %, 80 %, 40 %, 10 % / 100, 60, 60, 10
    )
    assert measured.critical == 32  # mean progress 100, 70, 50, 10 %
    assert measured.interval == (16, 64)  # the repeats' 16 and 32, and the size above 32


def test_the_runs_noise_scale_is_read_from_the_checkpoint_and_printed(capsys):
    from largebatch.noise import NoiseScale

    state = {"noise": NoiseScale(g2=2.0, trace=68.0, count=20).state_dict()}
    assert cbs._noise_of(state) == 34.0 and cbs._noise_of({"noise": None}) is None
    result = {
        "checkpoint": "ckpt",
        "step": 10,
        "fresh_optimizer": False,
        **cbs.Measurement([8, 16], 32, 0.5, 2.0, [[1.0, 1.2]]).record(),
        "global_batch": 64,
        "gns": 34.0,
    }
    cbs.report(result)
    out = capsys.readouterr().out
    assert "run's global batch 64 = 4 × the critical batch" in out
    assert "noise scale B_noise = 34 = 2.12 × the critical batch" in out
