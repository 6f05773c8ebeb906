"""The package installs under the project's own import name, with every folder of code in it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _setuptools() -> dict[str, object]:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert isinstance(table, dict)
    return table


def test_every_package_folder_is_listed_under_its_installed_name() -> None:
    setuptools = _setuptools()
    folders = setuptools["package-dir"]
    assert isinstance(folders, dict)
    expected: set[str] = set()
    for name, folder in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join((name, *relative)))
    packages = setuptools["packages"]
    assert isinstance(packages, list)
    assert set(packages) == expected


def test_nothing_installs_under_a_generic_top_level_name() -> None:
    packages = _setuptools()["packages"]
    assert isinstance(packages, list)
    assert {name.split(".")[0] for name in packages} == {"outbox_relay"}
