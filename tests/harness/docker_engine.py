"""Whether a Docker engine answers, and whether it can have an image: the probes behind
:func:`tests.harness.server_choice.choose`.

The engine is found where testcontainers will look for it (``tc.host`` in
``~/.testcontainers.properties``, ``DOCKER_HOST``, the current docker context, else the default
socket), so a "yes" here means testcontainers can start the container. Podman's API service
counts (``podman system service``, ``DOCKER_HOST=unix://...``).

Fast when there is no engine: a missing unix socket is seen without a connection attempt, and an
engine that does not answer is given a few seconds at most. Answers are remembered for the run,
so three servers ask the engine once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from tests.harness.server_choice import Availability

__all__ = ["engine_address", "engine_availability", "engine_client", "image_availability"]

_DEFAULT_ADDRESS = "unix:///var/run/docker.sock"
_PING_TIMEOUT_S = 3
# A registry lookup goes from the engine to the registry, which may be far away.
_REGISTRY_TIMEOUT_S = 20


def engine_address() -> str:
    """The engine's address as testcontainers resolves it."""
    from testcontainers.core.docker_client import get_docker_host

    return get_docker_host() or _DEFAULT_ADDRESS


@functools.cache
def engine_client() -> Any:
    """A docker client for the engine, or None when none answers (see :func:`engine_availability`)."""
    return _connect(engine_address())[0]


@functools.cache
def engine_availability() -> Availability:
    """Whether a Docker engine answers, with the address tried or the reason it does not."""
    address = engine_address()
    client, detail = _connect(address)
    return Availability(client is not None, detail)


def _connect(address: str) -> tuple[Any, str]:
    if address.startswith("unix://"):
        socket_path = Path(address.removeprefix("unix://"))
        if not socket_path.exists():
            return None, f"no Docker engine: {socket_path} does not exist"
    import docker

    try:
        client = docker.DockerClient(base_url=address, timeout=_PING_TIMEOUT_S)
        client.ping()
    except Exception as exc:
        return None, f"no Docker engine answers at {address}: {_one_line(exc)}"
    return client, f"Docker engine at {address}"


@functools.cache
def image_availability(image: str) -> Availability:
    """Whether the engine holds ``image``, or can pull it (its registry knows it)."""
    client = engine_client()
    if client is None:
        return engine_availability()
    import docker.errors

    try:
        client.images.get(image)
        return Availability(True, f"image {image} is in the engine")
    except docker.errors.ImageNotFound:
        pass
    except Exception as exc:
        return Availability(False, f"cannot look up image {image}: {_one_line(exc)}")
    try:
        client.api.timeout = _REGISTRY_TIMEOUT_S
        client.images.get_registry_data(image)
    except Exception as exc:
        why = _one_line(exc)
        return Availability(False, f"image {image} is not in the engine and cannot be pulled: {why}")
    finally:
        client.api.timeout = _PING_TIMEOUT_S
    return Availability(True, f"image {image} can be pulled")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
