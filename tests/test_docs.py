"""The docs: a README that stays a front door, a config reference generated from the code, links that resolve."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from conftest import ROOT

from largebatch.config import Config
from largebatch.config_reference import render

README = ROOT / "README.md"
DOCS = ROOT / "docs"
REGENERATE = (
    "regenerate it with `python -m largebatch.config_reference` (or `make docs`) and commit it"
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [README, ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_config_reference_is_up_to_date():
    assert (DOCS / "config.md").read_text() == render(), f"docs/config.md is stale; {REGENERATE}"


def test_every_config_key_is_in_the_config_reference():
    reference = (DOCS / "config.md").read_text()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(getattr(Config(), section.name)):
            assert f"`{section.name}.{key.name}`" in reference, (
                f"{section.name}.{key.name}: {REGENERATE}"
            )


def test_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= 15_000, (
        f"README.md is {size} bytes; move detail into docs/ (a topic page) and link it"
    )


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (ROOT / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text())
    }
    for page in DOCS.glob("*.md"):
        assert page.resolve() in linked, (
            f"docs/{page.name} is not linked from README.md's table of docs"
        )


def test_every_relative_link_resolves():
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            assert resolved.exists(), f"{page.name}: link {target} points at nothing"
            if anchor and resolved.suffix == ".md":
                assert anchor in _anchors(resolved), f"{page.name}: link {target}: no such heading"
