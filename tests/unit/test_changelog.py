"""CHANGELOG.md keeps up with the version in pyproject.toml (Keep a Changelog headings)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _headings() -> list[str]:
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)


def test_the_pyproject_version_has_a_changelog_heading() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version in _headings(), (
        f"pyproject.toml says version {version}: CHANGELOG.md needs a '## [{version}] - YYYY-MM-DD'"
        " section (move the Unreleased entries into it)"
    )


def test_the_changelog_starts_with_an_unreleased_section() -> None:
    assert _headings()[:1] == ["Unreleased"]
