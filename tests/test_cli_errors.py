"""Every user error is one line on stderr, `largebatch: error: ...`, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cli_in_process

CASES = {
    "unknown_key": (["train", "optim.lrr=0.1"], "did you mean 'lr'"),
    "unknown_section": (["train", "optimizer.lr=0.1"], "did you mean 'optim'"),
    "wrong_type": (["train", "optim.lr=fast"], "optim.lr='fast' must be a number"),
    "bool_for_int": (
        ["train", "batch.global_size=true"],
        "batch.global_size=True must be an integer",
    ),
    "negative_lr": (["train", "optim.lr=-0.1"], "optim.lr=-0.1 must be positive"),
    "zero_global_batch": (
        ["train", "batch.global_size=0"],
        "batch.global_size=0 must be a positive integer",
    ),
    "negative_micro_batch": (
        ["train", "batch.micro_size=-4"],
        "batch.micro_size=-4 must be a positive integer",
    ),
    "indivisible_batch": (
        ["train", "batch.global_size=100", "batch.micro_size=64"],
        "use a multiple of 64",
    ),
    "accum_disagrees": (
        ["train", "batch.global_size=64", "batch.micro_size=8", "batch.accum_steps=3"],
        "disagrees",
    ),
    "missing_config": (["train", "--config", "no/such.yaml"], "config file no/such.yaml not found"),
    "unknown_optimizer": (["train", "optim.name=adamm"], "did you mean 'adamw'"),
    "unknown_model": (["train", "model.name=resnt"], "did you mean 'resnet'"),
    "unknown_dataset": (["train", "data.name=digit"], "did you mean 'digits'"),
    "warmup_longer_than_training": (
        ["train", "train.steps=10", "schedule.warmup_steps=10"],
        "warmup (10 steps)",
    ),
    "unknown_schedule": (["train", "schedule.name=cosin"], "did you mean 'cosine'"),
    "steps_and_epochs": (["train", "train.steps=10", "train.epochs=1"], "not both"),
    "global_larger_than_dataset": (
        ["train", "data.size=100", "batch.global_size=256"],
        "larger than the training set",
    ),
    "resnet_on_vectors": (["train", "model.name=resnet"], "needs image inputs"),
    "malformed_override": (["train", "optim.lr"], "must look like section.key=value"),
    "bad_precision": (["train", "train.precision=fp8"], "train.precision='fp8' is not one of"),
    "unknown_command": (["fly"], "invalid choice"),
    "bad_world_size_flag": (["plan", "--world-size", "two"], "invalid int value"),
    "bad_launcher_env": (["train"], "WORLD_SIZE='two' must be an integer"),
    "world_without_master": (["train"], "MASTER_ADDR is not set"),
    "nesterov_without_momentum": (
        ["train", "optim.nesterov=true", "optim.momentum=0"],
        "needs optim.momentum > 0",
    ),
    "momentum_of_one_or_more": (
        ["train", "optim.momentum=1.5"],
        "optim.momentum=1.5 must be in [0, 1), e.g. 0.9",
    ),
    "nan_lr": (["train", "optim.lr=.nan"], "optim.lr=nan must be finite"),
    "infinite_epochs": (["train", "train.epochs=.inf"], "train.epochs=inf must be finite"),
    "nan_in_a_list": (
        ["train", "optim.name=adamw", "optim.betas=[.nan, 0.999]"],
        "optim.betas=[nan, 0.999] must be finite",
    ),
    "negative_eps": (["train", "optim.eps=-1"], "optim.eps=-1.0 must not be negative"),
    "zero_eps_for_adam": (
        ["train", "optim.name=adamw", "optim.eps=0"],
        "optim.eps=0 must be positive for adamw",
    ),
    "negative_gamma": (
        # step's own check: under the default constant schedule the key is ignored, which is the error
        ["train", "schedule.name=step", "schedule.gamma=-3"],
        "schedule.gamma=-3.0 must be a decay factor in (0, 1], e.g. 0.1",
    ),
    "one_class": (["train", "data.classes=1"], "data.classes=1 must be at least 2"),
    "trust_clip_with_lars": (
        ["train", "optim.name=lars", "optim.trust_clip=5"],
        "optim.trust_clip is ignored with optim.name=lars (only lamb and lambc use it); "
        "remove it or set optim.name to one of those",
    ),
    "momentum_with_adamw": (
        ["train", "optim.name=adamw", "optim.momentum=0.5"],
        "optim.momentum is ignored with optim.name=adamw (only sgd, lars and larc use it)",
    ),
    "optim_key_with_torch_optimizer": (
        ["train", "optim.name=torch_optimizer:Lamb", "optim.betas=[0.9, 0.99]"],
        "optim.betas is ignored with optim.name=torch_optimizer:Lamb (only adamw, lamb, "
        "lambc and muon use it); remove it or pass the class's own option in optim.options",
    ),
    "memory_limit_without_auto": (
        ["train", "batch.micro_size=64", "batch.memory_limit=2GiB"],
        "batch.memory_limit is ignored with batch.micro_size=64 (only auto uses it); "
        "remove it or set batch.micro_size=auto",
    ),
    "gamma_without_step_schedule": (
        ["train", "schedule.name=cosine", "schedule.gamma=0.5"],
        "schedule.gamma is ignored with schedule.name=cosine (only step uses it); "
        "remove it or set schedule.name=step",
    ),
    "min_lr_ratio_with_step_schedule": (
        ["train", "schedule.name=step", "schedule.min_lr_ratio=0.1"],
        "(only cosine and poly use it)",
    ),
    "loss_scale_without_fp16": (
        ["train", "train.fp16_init_scale=1024"],
        "train.fp16_init_scale is ignored with train.precision=fp32 (only fp16 uses it)",
    ),
    "synthetic_key_with_digits": (
        ["train", "data.name=digits", "model.name=resnet", "data.size=100"],
        "data.size is ignored with data.name=digits (only synthetic uses it); "
        "remove it or set data.name=synthetic",
    ),
    "heads_with_mlp": (
        ["train", "model.heads=8"],
        "model.heads is ignored with model.name=mlp (only gpt uses it)",
    ),
    "ignored_key_with_misspelt_dataset": (
        ["train", "data.name=digit", "data.size=100"],
        "did you mean 'digits'",
    ),
}

ENVS = {
    "bad_launcher_env": {"WORLD_SIZE": "two"},
    "world_without_master": {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": ""},
}


@pytest.mark.parametrize("name", CASES)
def test_user_error_is_one_line_and_exit_2(name):
    args, message = CASES[name]
    result = cli_in_process(*args, env=ENVS.get(name))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("largebatch: error: ")
    assert message in lines[0]


def test_invalid_yaml_names_the_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n  name: [sgd\n")
    result = cli_in_process("train", "--config", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not valid YAML at line" in result.stderr


def test_non_mapping_yaml_is_rejected(tmp_path: Path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    result = cli_in_process("train", "--config", str(bad))
    assert result.returncode == 2 and "must be a mapping of sections" in result.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        (
            "optim.name=lars",
            "optim.trust_clip=null",
            "optim.betas=[0.9, 0.999]",
            "schedule.milestones=[0.5, 0.75]",
        ),
        (
            "batch.micro_size=auto",
            "batch.memory_limit=2GiB",
            "schedule.name=step",
            "schedule.gamma=0.5",
        ),
        (
            "data.name=text",
            "data.context=32",
            "model.name=gpt",
            "model.heads=2",
            "optim.name=lamb",
            "optim.trust_clip=5",
        ),
    ],
)
def test_keys_set_to_their_default_or_used_by_the_mode_are_accepted(overrides):
    result = cli_in_process("plan", *overrides)
    assert result.returncode == 0, result.stderr
