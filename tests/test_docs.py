"""The README documents every config key."""

from __future__ import annotations

import dataclasses

from conftest import ROOT

from largebatch.config import Config


def test_every_config_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"`{section.name}.{key.name}`" in readme
