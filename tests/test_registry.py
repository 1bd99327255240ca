"""The registries: light declarations (name, config keys, checks, code) that config.py asks without importing torch."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from largebatch import config, registry
from largebatch.config import Config
from largebatch.errors import UserError

ENTRIES = [
    pytest.param(entry, id=f"{decider}={name}")
    for decider, table in registry.REGISTRIES.items()
    for name, entry in table.items()
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_uses_only_keys_the_config_has(entry: registry.Entry) -> None:
    sections = typing.get_type_hints(Config)
    for key in entry.keys:
        section, name = key.split(".")
        assert name in typing.get_type_hints(sections[section]), key


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.values[0].code])
def test_every_entry_code_loads(entry: registry.Entry) -> None:
    assert callable(entry.load())


def test_the_checks_of_the_chosen_entry_run_and_those_of_the_others_do_not() -> None:
    with pytest.raises(UserError, match=r"engine.zero_stage=5 must be 0, 1, 2 or 3"):
        config.load(None, ["engine.name=deepspeed", "engine.zero_stage=5"])
    with pytest.raises(UserError, match=r"engine.zero_stage is ignored with engine.name=ddp"):
        config.load(None, ["engine.zero_stage=5"])


def test_importing_and_validating_a_config_imports_no_torch() -> None:
    code = (
        "import sys, largebatch.config as c; "
        "c.load(None, ['engine.name=deepspeed', 'model.name=gpt', 'data.name=text']); "
        "assert not {'torch', 'numpy', 'deepspeed'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("decider", "value", "entry"),
    [
        ("model.name", "hf:./my-gpt2", "hf:<name-or-dir>"),
        ("model.name", "torchvision:resnet18", "torchvision:<name>"),
        ("model.name", "mypkg.models:build", registry.FACTORY),
        ("data.name", "mypkg.data:build", registry.FACTORY),
        ("data.name", "tokens", "tokens"),
    ],
)
def test_a_name_falls_under_its_entry_a_hub_prefix_or_the_factory(decider, value, entry) -> None:
    assert config.mode(decider, value) == entry
