"""podman for the image tests: made ready by tests/deploy/podman-setup, the image built by
`make image`, podman's Docker-compatible API served on a private socket for testcontainers, and the
podman CLI for what that API has no word for (pods).

Every podman command runs with CONTAINERS_CONF pointing at tests/deploy/containers.conf (unless
the environment names another file), as `make image` does.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.harness.process import Watchdog

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SETUP = HERE / "podman-setup"
CANNOT_RUN = 3  # podman-setup's exit code when podman cannot run on this machine
_READY = re.compile(r"podman-setup: ready base=(\S+) seconds=(\d+) made=(yes|no)")
# A build step other than FROM (a FROM is never "from cache": it names the image to start from).
_STEP = re.compile(r"^\[\d+/\d+\] STEP \d+/\d+: (?!FROM )", re.MULTILINE)


def image_tag() -> str:
    """The tag `make image` gives: outbox-relay:<the project's version>."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"localhost/outbox-relay:{version}"


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))
    return env


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A podman CLI command; its output as text. Raises with podman's own words when it fails."""
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=podman_env()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
    return result


class PodmanUnavailable(Exception):
    """podman cannot run here (podman-setup said so): the one reason to skip the image tests."""


@dataclass(frozen=True)
class Build:
    """What one `make image` did and how long it took."""

    seconds: float
    steps: int
    cached_steps: int
    output: str

    @classmethod
    def parse(cls, seconds: float, output: str) -> Build:
        return cls(seconds, len(_STEP.findall(output)), output.count("--> Using cache"), output)

    def describe(self) -> str:
        return f"{self.seconds:.1f} s, {self.cached_steps} of {self.steps} steps from podman's layer cache"


@dataclass(frozen=True)
class ImageBuilds:
    """The stand-in base and the image, as this test run found or made them."""

    base: str
    base_seconds: int
    base_made: bool
    first: Build
    again: Build

    def report(self) -> list[str]:
        how = "made now (cold)" if self.base_made else "found in podman's storage (cached)"
        return [
            f"base image {self.base}: {how}, {self.base_seconds} s",
            f"make image: {self.first.describe()}",
            f"make image again: {self.again.describe()}",
        ]


def prepare_podman() -> tuple[str, int, bool]:
    """podman-setup: podman installed, the base image in podman's storage. Returns (base, seconds,
    made now); raises PodmanUnavailable where podman cannot run, AssertionError on a failure."""
    result = subprocess.run(
        ["bash", str(SETUP)], capture_output=True, text=True, timeout=900, env=podman_env()
    )
    if result.returncode == CANNOT_RUN:
        raise PodmanUnavailable(result.stderr.strip().splitlines()[-1])
    assert result.returncode == 0, f"podman-setup failed:\n{result.stderr}"
    ready = _READY.search(result.stderr)
    assert ready, f"podman-setup said nothing of its base:\n{result.stderr}"
    return ready.group(1), int(ready.group(2)), ready.group(3) == "yes"


def make_image(context: Path = ROOT, tag: str | None = None) -> Build:
    """`make image` in `context` (a checkout), timed."""
    started = time.monotonic()
    command = ["make", "-s", "-C", str(context), "image"] + ([f"IMAGE={tag}"] if tag else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=podman_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"make image failed:\n{output[-4000:]}"
    return Build.parse(time.monotonic() - started, output)


def build_images() -> ImageBuilds:
    """The base (made when missing) and the image, built twice: the second build shows what a
    build with nothing changed costs."""
    base, base_seconds, made = prepare_podman()
    return ImageBuilds(base, base_seconds, made, make_image(), make_image())


def build_flags() -> list[str]:
    """The flags `make image` gives `podman build` (podman-setup's, and the Docker format: OCI
    images have no HEALTHCHECK)."""
    result = subprocess.run(
        ["bash", str(SETUP), "--build-flags"], capture_output=True, text=True, timeout=900, env=podman_env()
    )
    assert result.returncode == 0, f"podman-setup failed:\n{result.stderr}"
    return [*result.stdout.split(), "--format=docker"]


def image_ids() -> set[str]:
    """Every image in podman's storage, intermediate ones too."""
    return set(podman("images", "--all", "--quiet", "--no-trunc").stdout.split())


@contextmanager
def temporary_build(context: Path, tag: str) -> Iterator[Build]:
    """`podman build` of `context` as `make image` builds; afterwards the tag and the layers this
    build made are removed again (what was cached before stays: later builds use it)."""
    before = image_ids()
    started = time.monotonic()
    result = podman("build", *build_flags(), "--tag", tag, str(context), timeout=900, check=False)
    build = Build.parse(time.monotonic() - started, result.stdout + result.stderr)
    try:
        assert result.returncode == 0, f"podman build failed:\n{build.output[-4000:]}"
        yield build
    finally:
        podman("rmi", tag, check=False)
        _remove_untagged(image_ids() - before)


def _remove_untagged(images: set[str]) -> None:
    """Remove those of `images` that have no tag (another build's tagged image stays), newest
    first, each on its own: one still in use or with children stays too."""
    created = {}
    for image in images:
        facts = podman("image", "inspect", "--format", "{{len .RepoTags}} {{.Created}}", image, check=False)
        tags, _, when = facts.stdout.partition(" ")
        if facts.returncode == 0 and tags == "0":
            created[image] = when
    for image in sorted(created, key=created.__getitem__, reverse=True):
        podman("rmi", image, check=False)


@contextmanager
def api_service(directory: Path) -> Iterator[str]:
    """`podman system service` on a socket in `directory`, for as long as the block runs; yields
    its DOCKER_HOST. Stopped by its PID (a watchdog does it if this process is killed)."""
    socket = directory / "podman.sock"
    url = f"unix://{socket}"
    log = (directory / "podman-service.log").open("wb")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", url],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=podman_env(),
        start_new_session=True,
    )
    watchdog = Watchdog()
    watchdog.arm(pid=service.pid)
    try:
        _wait_for_api(url, service)
        yield url
    finally:
        service.terminate()
        try:
            service.wait(timeout=20)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=10)
        watchdog.disarm()
        log.close()


def _wait_for_api(url: str, service: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert service.poll() is None, f"podman system service exited {service.returncode}"
        try:
            # The client asks the server's API version as it is made: that is the first request.
            docker.DockerClient(base_url=url, timeout=5).close()
            return
        except docker.errors.DockerException:
            assert time.monotonic() < deadline, f"podman's API did not answer on {url} in {timeout} s"
            time.sleep(0.1)


@contextmanager
def pod(name: str) -> Iterator[str]:
    """A pod on the host's network (the tests' servers listen on 127.0.0.1); removed with all its
    containers afterwards, by a watchdog too if this process is killed."""
    podman("pod", "create", "--name", name, "--network", "host")
    watchdog = Watchdog()
    watchdog.arm(commands=[["podman", "pod", "rm", "--force", name]], env=podman_env())
    try:
        yield name
    finally:
        podman("pod", "rm", "--force", name, check=False)
        watchdog.disarm()


def run_in_pod(pod_name: str, name: str, options: Sequence[str], image: str, *command: str) -> str:
    """Start a container in the pod, detached, read-only with a /tmp of its own; returns its id."""
    return podman(
        "run", "--detach", "--pod", pod_name, "--name", name, "--read-only", "--tmpfs", "/tmp",
        "--no-healthcheck", *options, image, *command,
    ).stdout.strip()  # fmt: skip
