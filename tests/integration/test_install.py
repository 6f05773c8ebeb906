"""The README's Install section works as written: its two `sh` blocks run line by line in bash,
in a fresh clone of this repository (only the `git clone` URL is replaced by the local
repository, at its committed HEAD), each with a fresh virtualenv. Then: `--version` says the
pyproject version, the wheel and the sdist are there, a wheel built from the sdist equals one
built from the checkout, and the wheel-installed relay loads every connector and checks the
example config. pip's cache is shared by the test's venvs and kept between runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import REPO

CLONE_URL = "https://github.com/outbox-relay/outbox-relay.git"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION: str = PYPROJECT["project"]["version"]

pytestmark = pytest.mark.timeout(900)  # a cold pip cache downloads every dependency


def install_blocks(readme: Path) -> list[str]:
    """The first two ```sh blocks of the README's '## Install' section."""
    section = re.search(r"^## Install[ \t]*\n(.*?)(?=^## |\Z)", readme.read_text(), re.MULTILINE | re.DOTALL)
    if section is None:
        pytest.fail(
            f"{readme} has no '## Install' section: this test runs the install commands the README"
            " gives (the first two ```sh blocks under '## Install'), so the README must have them"
        )
    blocks = re.findall(r"^```sh\n(.*?)^```", section[1], re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2, f"{readme}: '## Install' needs two ```sh blocks (checkout, then wheel)"
    return blocks[:2]


def pip_cache() -> Path:
    """pip's cache for the test's venvs, kept between runs so a warm run downloads nothing."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("PIP_CACHE_DIR") or base / "outbox-relay-tests" / "pip")


def clean_env() -> dict[str, str]:
    """The environment without this test run's virtualenv: the blocks make their own."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    ours = Path(sys.prefix).resolve()
    path = [
        p for p in env.get("PATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(ours)
    ]
    env.update(PATH=os.pathsep.join(path), PIP_CACHE_DIR=str(pip_cache()), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def run_bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`script` in bash, stopping at the first line that fails (-x: each line is in stderr)."""
    result = subprocess.run(
        ["bash", "-c", "set -ex -o pipefail\n" + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert result.returncode == 0, f"in {cwd}:\n{script}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


@dataclass(frozen=True)
class Installed:
    clone: Path
    version_output: str
    wheel_venv: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Both blocks run: the first from an empty directory (it clones and installs from the
    checkout), the second in the clone with a virtualenv of its own (so the wheel, not the
    checkout install, is what it tests)."""
    checkout_block, wheel_block = install_blocks(REPO / "README.md")
    assert f"git clone {CLONE_URL}" in checkout_block, f"the first block clones {CLONE_URL}"
    work = tmp_path_factory.mktemp("install")
    env = clean_env()
    # Under the URL's last name, so that the clone gets the directory the block cds into.
    origin = work / "origin" / CLONE_URL.rsplit("/", 1)[1]
    origin.parent.mkdir()
    origin.symlink_to(REPO)
    script = checkout_block.replace(f"git clone {CLONE_URL}", f"git clone {shlex.quote(str(origin))}")
    first = run_bash(script, work, env)
    clone = work / "outbox-relay"
    venv = work / "wheel-venv"
    run_bash(f"python3 -m venv {venv}\n. {venv}/bin/activate\n{wheel_block}", clone, env)
    return Installed(clone, first.stdout.strip().splitlines()[-1], venv, env)


def test_the_version_the_checkout_install_prints_is_the_pyproject_version(installed: Installed) -> None:
    assert installed.version_output == f"outbox-relay, version {VERSION}"


def test_the_readme_names_the_wheel_of_the_pyproject_version() -> None:
    _, wheel_block = install_blocks(REPO / "README.md")
    named = set(re.findall(r"outbox_relay-([^-\s]+)-py3-none-any\.whl", wheel_block))
    assert named == {VERSION}, (
        f"README.md's Install section names the wheel of version {sorted(named)}, pyproject.toml says"
        f" {VERSION}: the wheel's name in the README must follow the version (update both together)"
    )


def test_the_build_leaves_the_wheel_and_the_sdist(installed: Installed) -> None:
    dist = sorted(path.name for path in (installed.clone / "dist").iterdir())
    assert dist == [f"outbox_relay-{VERSION}-py3-none-any.whl", f"outbox_relay-{VERSION}.tar.gz"]


def _contents(wheel: Path) -> dict[str, int]:
    with zipfile.ZipFile(wheel) as archive:
        return {info.filename: info.CRC for info in archive.infolist()}


def test_a_wheel_built_from_the_sdist_equals_one_built_from_the_checkout(installed: Installed) -> None:
    """`python -m build` builds its wheel from the sdist: a file the sdist lacks would be missing
    from it, or a package would be empty."""
    direct = installed.clone.parent / "direct"
    run_bash(
        f". {installed.wheel_venv}/bin/activate\npython -m build --wheel --outdir {direct} .",
        installed.clone,
        installed.env,
    )
    name = f"outbox_relay-{VERSION}-py3-none-any.whl"
    from_sdist, from_checkout = _contents(installed.clone / "dist" / name), _contents(direct / name)
    assert from_sdist == from_checkout
    assert "outbox_relay/connectors/sinks/kafka/__init__.py" in from_sdist


_LOAD_PLUGINS = """
import json
from importlib.metadata import entry_points
loaded = {}
for group in ("outbox_relay.sources", "outbox_relay.sinks"):
    for entry in entry_points(group=group):
        entry.load()
        loaded.setdefault(group, []).append(entry.name)
print(json.dumps({group: sorted(names) for group, names in loaded.items()}))
"""


def test_the_wheel_installed_relay_loads_every_connector_entry_point(installed: Installed) -> None:
    result = subprocess.run(
        [str(installed.wheel_venv / "bin" / "python"), "-c", _LOAD_PLUGINS],
        cwd=installed.clone.parent,  # (not the clone: nothing is imported from the checkout)
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    declared: dict[str, Any] = PYPROJECT["project"]["entry-points"]
    assert json.loads(result.stdout) == {group: sorted(table) for group, table in declared.items()}


def test_the_wheel_installed_relay_checks_the_example_config(installed: Installed) -> None:
    env = {**installed.env, "DATABASE_URL": "postgresql://relay@db.example:5432/app"}
    result = subprocess.run(
        [str(installed.wheel_venv / "bin" / "outbox-relay"), "check", "-c", "config/relay.example.yaml"],
        cwd=installed.clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config/relay.example.yaml: ok" in result.stdout + result.stderr
