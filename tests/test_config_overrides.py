"""Overrides: `section.key.sub=value` sets one entry of a mapping, `key={...}` replaces it; config-file keys that the
chosen model or dataset does not use are one warning (and reset), while such an override stays an error; every
override form the package prints names a real key."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cli, cli_in_process, write_tiny_gpt2

from largebatch import config

FILE = {
    "model": {"name": "mymod:build", "args": {"n_layer": 2, "n_head": 2, "vocab_size": 99}},
    "engine": {
        "name": "deepspeed",
        "ds_config": {"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    },
}
USER_MODEL = ("model.name=flat:build",)
"""tests/tasks/flat.py, importable with tests/tasks on the path."""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gpt.yaml"
    path.write_text(yaml.safe_dump(FILE))
    return path


def one_line_error(*args: str) -> str:
    result = cli_in_process("plan", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def test_a_sub_key_override_sets_one_builder_argument_and_keeps_the_rest(config_file: Path):
    cfg = config.load(config_file, ["model.args.n_layer=4"])
    assert cfg.model.args == {"n_layer": 4, "n_head": 2, "vocab_size": 99}


def test_a_mapping_override_replaces_the_whole_mapping(config_file: Path):
    assert config.load(config_file, ["model.args={n_layer: 4}"]).model.args == {"n_layer": 4}


def test_a_nested_ds_config_entry_merges_into_the_file_and_reads_as_a_number(config_file: Path):
    cfg = config.load(config_file, ["engine.ds_config.zero_optimization.reduce_bucket_size=5e7"])
    assert cfg.engine.ds_config == {
        "zero_optimization": {"stage3_param_persistence_threshold": 0, "reduce_bucket_size": 5e7}
    }


def test_a_sub_key_override_creates_the_mappings_it_needs():
    cfg = config.load(None, ["data.name=mymod:data", "data.args.split.size=100"])
    assert cfg.data.args == {"split": {"size": 100}}


def test_a_sub_key_override_leaves_the_callers_mapping_unchanged():
    given = {"model": {"name": "mymod:build", "args": {"n_layer": 2}}}
    config.load(given, ["model.args.n_layer=4"])
    assert given["model"]["args"] == {"n_layer": 2}


def test_a_sub_key_of_a_key_that_is_not_a_mapping_is_one_line_naming_those_that_are():
    line = one_line_error("optim.lr.x=1")
    assert "optim.lr has no sub-keys" in line
    assert all(key in line for key in config.mapping_keys())


def test_a_sub_key_inside_an_entry_that_is_not_a_mapping_is_one_line(config_file: Path):
    line = one_line_error("--config", str(config_file), "model.args.n_layer.x=1")
    assert "model.args.n_layer=2 is not a mapping" in line


def test_a_sub_key_of_a_ds_config_file_is_one_line(tmp_path: Path):
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump({"engine": {"name": "deepspeed", "ds_config": "ds.json"}}))
    line = one_line_error("--config", str(path), "engine.ds_config.zero_optimization.stage=1")
    assert "engine.ds_config=ds.json names a file" in line


def test_a_ds_config_sub_key_reaches_deepspeed_s_checks():
    line = one_line_error(
        f"--config={ROOT / 'configs/lamb-lm.yaml'}",
        "model.width=32",
        "batch.global_size=32",
        "optim.name=adamw",
        "engine.name=deepspeed",
        "engine.zero_stage=2",
        "engine.ds_config.zero_optimization.stage=3",
    )
    assert "engine.ds_config sets zero_optimization.stage=3 but engine.zero_stage gives 2" in line


PLACEHOLDER = "{expr}"
"""What an f-string field reads as in a printed override: its value is only known when the message is made."""
OVERRIDE = re.compile(r"(?<![\w./$-])([a-z_]+(?:\.[A-Za-z_0-9]+)+)=")
VALUE = re.compile(r"[^\s,;)'\"`]*")


def _strings(tree: ast.AST) -> list[str]:
    """Every string constant, with each f-string whole (its fields as PLACEHOLDER), not in pieces."""
    parts = {
        id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values
    }
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            texts.append(
                "".join(
                    v.value if isinstance(v, ast.Constant) else PLACEHOLDER for v in node.values
                )
            )
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts
        ):
            texts.append(node.value)
    return texts


def _value(text: str, start: int) -> str:
    """The value after `key=`: a bracketed YAML list or mapping, or up to a space or punctuation."""
    if text[start : start + 1] in ("[", "{"):
        depth = 0
        for end in range(start, len(text)):
            depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start : end + 1]
    return VALUE.match(text, start).group(0).rstrip(".:")


def printed_overrides() -> list[str]:
    """Every `section.key[.sub]=value` in the package's strings (messages, help, docstrings), except the generic
    `section.key=value` the usage lines show."""
    found = set()
    for path in sorted((ROOT / "largebatch").rglob("*.py")):
        for text in _strings(ast.parse(path.read_text())):
            for match in OVERRIDE.finditer(text):
                if not match.group(1).startswith("section."):
                    found.add(f"{match.group(1)}={_value(text, match.end())}")
    return sorted(found)


def test_the_package_prints_override_forms():
    assert {"model.args.num_classes=" + PLACEHOLDER, "optim.lr=0.2", "run.resume=never"} <= set(
        printed_overrides()
    )


@pytest.mark.parametrize("override", printed_overrides())
def test_every_override_form_the_package_prints_names_a_real_key(override: str):
    section, key, sub_keys, value = config._parse_override(override)
    if PLACEHOLDER not in override:  # a literal value must also be one the key takes
        for name in reversed(sub_keys):
            value = {name: value}
        config._build_section(section, {key: value})


def test_config_file_keys_the_model_does_not_use_are_one_warning_and_reset(capsys):
    cfg = config.load(ROOT / "configs/quickstart.yaml", list(USER_MODEL))
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("largebatch: warning: ")
    assert "model.norm, model.width, model.depth (unused with model.name=flat:build)" in warning[0]
    assert (cfg.model.norm, cfg.model.width, cfg.model.depth) == ("none", 256, 2)


def test_keys_of_a_mapping_given_in_python_count_as_config_file_keys(capsys):
    given = {"model": {"name": "resnet", "width": 16}, "data": {"name": "digits"}}
    cfg = config.load(
        given, ["model.name=python:Net"]
    )  # what largebatch.train(given, model=Net) loads
    assert cfg.model.width == 256
    assert "model.width (unused with model.name=python:Net)" in capsys.readouterr().err


def test_an_override_the_model_does_not_use_stays_an_error():
    line = one_line_error(
        f"--config={ROOT / 'configs/quickstart.yaml'}", *USER_MODEL, "model.width=8"
    )
    assert "model.width is ignored with model.name=flat:build" in line


def test_a_user_model_on_the_quickstart_config_trains_with_one_warning(tmp_path: Path):
    result = cli(
        "train",
        f"--config={ROOT / 'configs/quickstart.yaml'}",
        *USER_MODEL,
        f"run.dir={tmp_path}",
        "train.epochs=null",
        "train.steps=2",
        "schedule.warmup_epochs=null",
        "logging.progress=false",
        env={"PYTHONPATH": str(ROOT / "tests" / "tasks")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "largebatch: warning: config keys that do not apply are reset to their defaults: "
        "model.norm, model.width, model.depth (unused with model.name=flat:build)"
    ]
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert (written["norm"], written["width"], written["depth"]) == ("none", 256, 2)


def test_an_hf_model_on_the_lamb_lm_config_plans_with_one_warning(tmp_path: Path):
    gpt2 = write_tiny_gpt2(tmp_path / "gpt2")
    result = cli_in_process(
        "plan", f"--config={ROOT / 'configs/lamb-lm.yaml'}", f"model.name=hf:{gpt2}"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "largebatch: warning: config keys that do not apply are reset to their defaults: "
        f"model.width (unused with model.name=hf:{gpt2})"
    ]


def test_another_optimizer_on_a_shipped_config_resets_the_files_optimizer_keys_with_one_warning():
    switched = cli_in_process("plan", f"--config={ROOT / 'configs/lamb-lm.yaml'}", "optim.name=sgd")
    assert switched.returncode == 0, switched.stderr
    assert switched.stderr.strip().splitlines() == [
        "largebatch: warning: config keys that do not apply are reset to their defaults: "
        "optim.betas, optim.eps (unused with optim.name=sgd)"
    ]
    given = cli_in_process(
        "plan", f"--config={ROOT / 'configs/lamb-lm.yaml'}", "optim.name=sgd", "optim.eps=1e-6"
    )
    assert given.returncode == 2
    assert given.stderr.startswith("largebatch: error: optim.eps is ignored with optim.name=sgd")
