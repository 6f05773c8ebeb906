"""Helpers shared by the deploy tests: the Dockerfile parsed by Docker's own parser, the build
context as `.dockerignore` defines it, and `outbox-relay check` on a config file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import dockerfile

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CHART = ROOT / "helm" / "outbox-relay"


@cache
def dockerfile_commands() -> tuple[dockerfile.Command, ...]:
    return tuple(dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> list[tuple[str, list[dockerfile.Command]]]:
    """(name, commands) per build stage, FROM included, in order."""
    out: list[tuple[str, list[dockerfile.Command]]] = []
    for command in dockerfile_commands():
        if command.cmd.upper() == "FROM":
            value = list(command.value)
            name = value[2] if len(value) >= 3 and value[1].upper() == "AS" else str(len(out))
            out.append((name, [command]))
        elif out:
            out[-1][1].append(command)
    return out


def final_stage() -> list[dockerfile.Command]:
    return stages()[-1][1]


def instruction(commands: list[dockerfile.Command], name: str) -> list[dockerfile.Command]:
    return [c for c in commands if c.cmd.upper() == name]


def image_cmd() -> list[str]:
    (cmd,) = instruction(final_stage(), "CMD")
    return list(cmd.value)


def env_of(commands: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in instruction(commands, "ENV"):
        values = list(command.value)
        env.update(zip(values[0::2], values[1::2], strict=True))
    return env


# --- .dockerignore, with Docker's semantics ------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(f"^{out}$")


@cache
def _ignore_rules() -> tuple[tuple[bool, re.Pattern[str]], ...]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return tuple(rules)


def in_build_context(relative: str) -> bool:
    """Whether Docker sends this path to the builder: the last pattern that matches the path or
    one of its parent directories decides, `!` re-includes."""
    parts = Path(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for negated, regex in _ignore_rules():
        if any(regex.match(c) for c in candidates):
            included = negated
    return included


def build_context_files() -> list[str]:
    files = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith((".git/", ".venv/")) or not path.is_file():
            continue
        if in_build_context(relative):
            files.append(relative)
    return sorted(files)


# --- outbox-relay check ------------------------------------------------------------------------


def relay_check(config_file: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m outbox_relay check -c FILE` with exactly these extra environment variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS")}
    return subprocess.run(
        [sys.executable, "-m", "outbox_relay", "check", "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **env},
        cwd=ROOT,
    )


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The environment a pod gives the relay container: plain values as they are, each value
    taken from a Secret replaced by a stand-in (the test never has the real Secret)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif item["name"] == "DATABASE_URL" or item["name"].endswith("_URL"):
            env[item["name"]] = "postgresql://relay:stand-in@db:5432/app"
        else:
            env[item["name"]] = "stand-in"
    return env
