"""`largebatch train` end to end: the run directory contract, reproducibility, the quickstart result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, cli, metrics, train, train_in_one_job

from largebatch.config import ScheduleConfig
from largebatch.optim.schedules import Schedule

SMALL = (
    "data.size=1024",
    "data.eval_size=256",
    "model.width=32",
    "train.steps=20",
    "train.log_every=5",
)


def test_run_directory_holds_resolved_config_metrics_and_summary(run_dirs):
    run = run_dirs("contract")
    summary = train(
        run,
        *SMALL,
        "batch.global_size=64",
        "batch.micro_size=16",
        "optim.lr=0.1",
        "optim.reference_batch=32",
        "train.eval_every=10",
        own_process=True,  # first_step_s counts from the process's start
    )
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    derived = resolved["derived"]
    assert (derived["global_batch"], derived["micro_batch"], derived["accum_steps"]) == (64, 16, 4)
    assert derived["peak_lr"] == pytest.approx(0.2) and derived["world_size"] == 1
    assert resolved["optim"]["lr"] == 0.1 and resolved["batch"]["global_size"] == 64
    records = metrics(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert [r["samples"] for r in records] == [320, 640, 960, 1280]
    for r in records:
        assert {"step", "samples", "loss", "lr", "grad_norm", "samples_per_s"} <= set(r)
        assert r["grad_norm"] > 0 and r["samples_per_s"] > 0
    assert (
        "eval/accuracy" in records[1]
        and "eval/accuracy" in records[3]
        and "eval/accuracy" not in records[0]
    )
    assert summary["steps"] == 20 and summary["samples"] == 1280
    assert summary["final_loss"] == records[-1]["loss"]
    assert set(summary["eval"]) == {"loss", "accuracy"}
    assert (
        summary["global_batch"],
        summary["micro_batch"],
        summary["accum_steps"],
        summary["world_size"],
    ) == (64, 16, 4, 1)
    assert summary["peak_lr"] == pytest.approx(0.2) and len(summary["params_sha256"]) == 64
    assert (
        0 < summary["first_step_s"] < summary["wall_s"] + 60
    )  # from the process's start: imports, the plan, ...


NORMS = ("batch", "group", "layer", "none")
RESNET = (
    "data.name=digits",
    "model.name=resnet",
    "model.width=8",
    "model.depth=1",
    "train.steps=30",
    "train.log_every=1",
    "batch.global_size=128",
    "optim.lr=0.2",
    "optim.scaling=none",
)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process runs of this file, trained one after another in one process (one interpreter start)."""
    base = tmp_path_factory.mktemp("one_process")
    quiet = (*SMALL, "logging.progress=false")
    runs = {
        "lr": (
            *quiet,
            "train.log_every=1",
            "schedule.name=cosine",
            "schedule.warmup_steps=5",
            "optim.scaling=none",
            "optim.lr=0.3",
        ),
        "a": quiet,
        "b": quiet,
        "c": (*quiet, "run.seed=1"),
        "w0": (*quiet, "data.workers=0"),
        "w2": (*quiet, "data.workers=2"),
        "threads": (*quiet, "run.threads=1"),
        **{norm: (*RESNET, f"model.norm={norm}", "logging.progress=false") for norm in NORMS},
    }
    train_in_one_job(base, runs, nproc=1)
    return base


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_logged_lr_follows_warmup_then_cosine(one_process):
    schedule = Schedule(ScheduleConfig(name="cosine"), total_steps=20, warmup_steps=5)
    assert [r["lr"] for r in metrics(one_process / "lr")] == pytest.approx(
        [0.3 * schedule.factor(s) for s in range(20)]
    )


def test_same_seed_is_bit_identical_and_another_seed_is_not(one_process):
    a, b, c = (_summary(one_process / name)["params_sha256"] for name in "abc")
    assert a == b != c


def test_results_do_not_depend_on_dataloader_workers(one_process):
    assert (
        _summary(one_process / "w0")["params_sha256"]
        == _summary(one_process / "w2")["params_sha256"]
    )


@pytest.mark.parametrize("norm", NORMS)
def test_resnet_trains_with_each_norm(one_process, norm):
    losses = [r["loss"] for r in metrics(one_process / norm)]
    assert sum(losses[-5:]) < sum(losses[:5])


BATCHNORM = (
    "data.name=digits",
    "model.name=resnet",
    "model.norm=batch",
    "model.width=8",
    "model.depth=1",
    "train.steps=12",
    "batch.global_size=64",
    "batch.micro_size=16",
    "optim.lr=0.2",
)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The 2-process runs of this file in one torchrun job (their stderr kept for the BatchNorm warning): the
    quickstart, then a BatchNorm ResNet. Returns the base folder and each run's stderr."""
    base = tmp_path_factory.mktemp("two_processes")
    runs = {
        "quickstart": (f"--config={ROOT / 'configs/quickstart.yaml'}", "logging.progress=false"),
        "bn": (*BATCHNORM, "logging.progress=false"),
    }
    return base, train_in_one_job(base, runs)


def test_quickstart_reaches_its_stated_accuracy_on_two_processes(two_processes):
    summary = _summary(two_processes[0] / "quickstart")
    assert (
        summary["world_size"] == 2
        and summary["global_batch"] == 512
        and summary["peak_lr"] == pytest.approx(0.4)
    )
    assert summary["eval"]["accuracy"] >= 0.98


def test_plan_command_prints_the_derived_plan():
    result = cli("plan", "--config", "configs/quickstart.yaml", "--world-size", "4")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(maxsplit=1) for line in result.stdout.splitlines())
    assert (fields["micro_batch"], fields["accum_steps"], fields["peak_lr"]) == ("128", "1", "0.4")


def test_eval_and_the_saved_model_use_the_same_batchnorm_statistics_on_every_rank(two_processes):
    """Each rank's BatchNorm running statistics drift apart in training; eval and model.pt both use rank 0's. The
    job's one BatchNorm warning is this run's (the quickstart's ResNet uses GroupNorm)."""
    from largebatch import config, trainer
    from largebatch import task as tasks
    from largebatch.dist import DistInfo

    base, stderr = two_processes
    run = base / "bn"
    assert _summary(run)["world_size"] == 2
    warnings = [line for line in "".join(stderr.values()).splitlines() if "BatchNorm" in line]
    assert len(warnings) == 1 and "micro-batch of 16" in warnings[0] and warnings[0] in stderr["bn"]
    cfg = config.load(None, list(BATCHNORM))
    task = tasks.build(cfg)
    model = task.build_model()
    model.load_state_dict(torch.load(run / "model.pt"))
    saved = trainer.evaluate(model, task, DistInfo(0, 0, 1, torch.device("cpu")), batch_size=32)
    logged = json.loads((run / "summary.json").read_text())["eval"]
    assert saved["accuracy"] == logged["accuracy"]
    assert saved["loss"] == pytest.approx(logged["loss"], rel=1e-6)


def test_the_thread_count_is_recorded_in_config_and_summary(one_process):
    run = one_process / "threads"
    assert _summary(run)["threads"] == 1
    assert yaml.safe_load((run / "config.yaml").read_text())["derived"]["threads"] == 1
