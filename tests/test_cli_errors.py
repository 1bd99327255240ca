"""Every user error is one line on stderr, `largebatch: error: ...`, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli

CASES = {
    "unknown_key": (["train", "optim.lrr=0.1"], "did you mean 'lr'"),
    "unknown_section": (["train", "optimizer.lr=0.1"], "did you mean 'optim'"),
    "wrong_type": (["train", "optim.lr=fast"], "optim.lr='fast' must be a number"),
    "bool_for_int": (["train", "batch.global_size=true"], "batch.global_size=True must be an integer"),
    "negative_lr": (["train", "optim.lr=-0.1"], "optim.lr=-0.1 must be positive"),
    "zero_global_batch": (["train", "batch.global_size=0"], "batch.global_size=0 must be a positive integer"),
    "negative_micro_batch": (["train", "batch.micro_size=-4"], "batch.micro_size=-4 must be a positive integer"),
    "indivisible_batch": (["train", "batch.global_size=100", "batch.micro_size=64"], "use a multiple of 64"),
    "accum_disagrees": (["train", "batch.global_size=64", "batch.micro_size=8", "batch.accum_steps=3"], "disagrees"),
    "missing_config": (["train", "--config", "no/such.yaml"], "config file no/such.yaml not found"),
    "unknown_optimizer": (["train", "optim.name=adamm"], "did you mean 'adamw'"),
    "unknown_model": (["train", "model.name=resnt"], "did you mean 'resnet'"),
    "unknown_dataset": (["train", "data.name=digit"], "did you mean 'digits'"),
    "warmup_longer_than_training": (["train", "train.steps=10", "schedule.warmup_steps=10"], "warmup (10 steps)"),
    "unknown_schedule": (["train", "schedule.name=cosin"], "did you mean 'cosine'"),
    "steps_and_epochs": (["train", "train.steps=10", "train.epochs=1"], "not both"),
    "global_larger_than_dataset": (["train", "data.size=100", "batch.global_size=256"], "larger than the training set"),
    "resnet_on_vectors": (["train", "model.name=resnet"], "needs image inputs"),
    "malformed_override": (["train", "optim.lr"], "must look like section.key=value"),
    "bad_precision": (["train", "train.precision=fp8"], "train.precision='fp8' is not one of"),
    "unknown_command": (["fly"], "invalid choice"),
    "bad_world_size_flag": (["plan", "--world-size", "two"], "invalid int value"),
    "bad_launcher_env": (["train"], "WORLD_SIZE='two' must be an integer"),
    "world_without_master": (["train"], "MASTER_ADDR is not set"),
    "nesterov_without_momentum": (["train", "optim.nesterov=true", "optim.momentum=0"], "needs optim.momentum > 0"),
}

ENVS = {
    "bad_launcher_env": {"WORLD_SIZE": "two"},
    "world_without_master": {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": ""},
}


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line_and_exit_2(name):
    args, message = CASES[name]
    result = cli(*args, env=ENVS.get(name), timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("largebatch: error: ")
    assert message in lines[0]


def test_invalid_yaml_names_the_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  name: [sgd\n")
    result = cli("train", "--config", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not valid YAML at line" in result.stderr


def test_non_mapping_yaml_is_rejected(tmp_path: Path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    result = cli("train", "--config", str(bad))
    assert result.returncode == 2 and "must be a mapping of sections" in result.stderr
