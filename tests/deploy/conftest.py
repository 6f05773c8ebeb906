"""Fixtures of the image tests (podman, the built image, podman's Docker API for testcontainers)
and the lines they report at the end of the run: build times and what the containers said."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from testcontainers.core.config import testcontainers_config

from tests.deploy.podman import ImageBuilds, PodmanUnavailable, api_service, build_images

REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if REPORT:
        terminalreporter.section("container image")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def image_builds() -> ImageBuilds:
    """podman ready, the base image in its storage, and `make image` run (twice: the second run
    shows what a build with nothing changed costs). Skips only where podman cannot run."""
    try:
        builds = build_images()
    except PodmanUnavailable as reason:
        pytest.skip(f"podman cannot run here: {reason}")
    REPORT.extend(builds.report())
    return builds


@pytest.fixture(scope="module")
def docker_host(image_builds: ImageBuilds, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker-compatible API on a private socket, named by DOCKER_HOST for testcontainers
    (Ryuk off: its image cannot be pulled here; the tests remove their containers themselves).
    For one module only: later tests must not find an engine that this fixture started."""
    with api_service(tmp_path_factory.mktemp("podman")) as url, pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", url)
        patch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
        # testcontainers reads that variable once and keeps the answer: say it to the config too.
        patch.setattr(testcontainers_config, "ryuk_disabled", True)
        yield url
