"""Where a test server comes from: configured, a container, or a private process.

Each harness asks :func:`choose` once per server it needs. The order is fixed:

1. **configured**: an environment variable names a server (``RELAY_TEST_PG_DSN``,
   ``KAFKA_BOOTSTRAP_SERVERS``, ``RELAY_TEST_AMQP_URL``): it is used as is;
2. **container**: a Docker engine answers and the server's image can be had (present in the
   engine, or pullable): testcontainers starts it;
3. **process**: a private server process, as the harness always could.

``RELAY_TEST_SERVERS`` narrows the choice: ``auto`` (the default) walks the order above,
``containers`` insists on step 2 (or fails with the reason it cannot be had), ``processes`` never
asks the engine anything. A configured server wins in every mode: the environment variable is
the stronger, more specific word.

Nothing here talks to an engine: the probes are passed in as callables, asked only when the
answer matters and at most once, so this logic is tested without Docker (tests/unit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "MODE_ENV_VAR",
    "Availability",
    "Choice",
    "Mode",
    "ServerChoiceError",
    "choose",
    "mode_from",
]

MODE_ENV_VAR = "RELAY_TEST_SERVERS"


class Mode(StrEnum):
    AUTO = "auto"
    CONTAINERS = "containers"
    PROCESSES = "processes"


class ServerChoiceError(RuntimeError):
    """The switch is invalid, or it asks for containers that cannot be had (a one-line reason)."""


@dataclass(frozen=True)
class Availability:
    """A probe's answer: whether the engine answers (or the image can be had), and why (not)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Choice:
    kind: Literal["configured", "container", "process"]
    reason: str


Probe = Callable[[], Availability]


def mode_from(environ: Mapping[str, str]) -> Mode:
    """The mode ``RELAY_TEST_SERVERS`` asks for (unset or empty: auto); ServerChoiceError for a
    value that is none of auto, containers, processes."""
    raw = environ.get(MODE_ENV_VAR, "").strip()
    if not raw:
        return Mode.AUTO
    try:
        return Mode(raw.lower())
    except ValueError:
        allowed = ", ".join(mode.value for mode in Mode)
        raise ServerChoiceError(f"{MODE_ENV_VAR}={raw!r}: must be one of {allowed}") from None


def choose(server: str, *, configured: str | None, mode: Mode, engine: Probe, image: Probe) -> Choice:
    """Where ``server`` (a name for messages, such as "PostgreSQL") comes from.

    ``configured`` names the environment variable that is set for it, if any. ``engine`` tells
    whether a Docker engine answers, ``image`` whether the server's image is in it or pullable;
    ``image`` is asked only once the engine answered.
    """
    if configured:
        return Choice("configured", f"{configured} is set")
    if mode is Mode.PROCESSES:
        return Choice("process", f"{MODE_ENV_VAR}=processes")
    found = engine()
    if found.ok:
        found = image()
    if found.ok:
        return Choice("container", found.detail)
    if mode is Mode.CONTAINERS:
        raise ServerChoiceError(f"{MODE_ENV_VAR}=containers, but no container for {server}: {found.detail}")
    return Choice("process", found.detail)
