"""Our container image, built with podman (`make image`) and run for real against the suite's
private PostgreSQL and Kafka-protocol broker: standalone through testcontainers (podman's Docker
API), and as a sidecar in a podman pod next to an application container made from the same image.

Containers share the host's network (the test servers listen on 127.0.0.1 only). The relay's
config is mounted over the image's default file; the root filesystem is read-only with a /tmp of
its own, as the Helm chart runs it.
"""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from testcontainers.core.container import DockerContainer

from outbox_relay.outbox import write_event
from tests.conftest import consume_event_ids, kafka_message_as_line
from tests.deploy.conftest import REPORT
from tests.deploy.podman import ImageBuilds, image_tag, pod, podman, run_in_pod, temporary_build
from tests.deploy.support import DOCKERFILE, build_context_files
from tests.harness.kafka import KafkaBroker
from tests.support import (
    assert_complete_and_ordered,
    free_port,
    relay_config,
    unpublished,
    wait_for,
    write_config,
)

pytest.importorskip("confluent_kafka")
# A first run on a machine installs podman, makes the base image and builds ours: minutes, not hangs.
# One worker builds and runs the image (make test runs two): one podman service, one build at a time.
pytestmark = [pytest.mark.timeout(900), pytest.mark.xdist_group("podman")]

CONFIG_IN_IMAGE = "/etc/outbox-relay/relay.yaml"
RELAY_UID = 10001


def _relay_config(tmp_path: Path, dsn: str, kafka: KafkaBroker) -> tuple[Path, str, int]:
    """relay.yaml for the container: Kafka sink to a fresh 4-partition topic, HTTP on a free
    loopback port. Returns (file, topic, http port)."""
    prefix = f"image-{uuid.uuid4().hex[:12]}"
    sink = kafka.order_sink(prefix, partitions=4)
    config = relay_config(dsn, sink)
    port = free_port()
    config["http"] = {"host": "127.0.0.1", "port": port}
    path = write_config(tmp_path, config)
    path.chmod(0o644)  # the relay reads it as uid 10001
    return path, f"{prefix}.order", port


def _write_events(dsn: str, count: int, aggregates: int) -> set[str]:
    """`count` events written with outbox_relay's write_event, one transaction each."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = set()
        for n in range(count):
            with conn.transaction():
                ids.add(write_event(conn, "order", f"order-{n % aggregates}", "OrderPlaced", {"n": n}))
        return ids


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _delivered(kafka: KafkaBroker, topic: str, wanted: set[str]) -> list[dict[str, Any]]:
    return [kafka_message_as_line(m) for m in consume_event_ids(kafka, topic, wanted, 60, least_wait=1.0)]


def _as_root(container: DockerContainer, script: str) -> tuple[int, str]:
    """A shell command run in the container as root (exec's user, not the relay's)."""
    code, output = container.get_wrapped_container().exec_run(["sh", "-c", script], user="0")
    assert code is not None, "exec_run returns the exit code when not detached"
    assert isinstance(output, bytes), "exec_run returns the output whole when not streaming"
    return code, output.decode()


def _assert_non_root_and_read_only(container: DockerContainer) -> None:
    status = container.exec(["cat", "/proc/1/status"]).output.decode()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert uids == [str(RELAY_UID)] * 4, f"the relay (PID 1) runs as {uids}"
    # Even root cannot write to the root filesystem: it is mounted read-only, not just not ours.
    for write in ("echo x > /probe", "touch /opt/outbox-relay/probe"):
        code, output = _as_root(container, write)
        assert code != 0, f"{write}: allowed"
        assert "Read-only file system" in output, output
    assert _as_root(container, "touch /tmp/probe")[0] == 0, "/tmp is the one writable place"


def test_the_image_runs_read_only_as_non_root_relays_every_event_and_exits_0_on_sigterm(
    image_builds: ImageBuilds, docker_host: str, dsn: str, kafka: KafkaBroker, tmp_path: Path
) -> None:
    config, topic, port = _relay_config(tmp_path, dsn, kafka)
    written = _write_events(dsn, 150, aggregates=10)  # a backlog before the start
    container = (
        DockerContainer(image_tag())
        .with_volume_mapping(str(config), CONFIG_IN_IMAGE, "ro")
        .with_tmpfs_mount("/tmp")
        .with_env("OUTBOX_RELAY_HEALTH_URL", f"http://127.0.0.1:{port}/healthz")
        .with_kwargs(network_mode="host", read_only=True)
    )
    with container:
        wait_for(lambda: _http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60, "/readyz 200")
        _assert_non_root_and_read_only(container)
        # The image's own HEALTHCHECK command, run by podman in the container.
        podman("healthcheck", "run", container.get_wrapped_container().id or "")
        written |= _write_events(dsn, 150, aggregates=10)  # and events while it runs
        lines = _delivered(kafka, topic, written)
        assert_complete_and_ordered(lines, written)
        wait_for(lambda: unpublished(dsn) == 0, 30, "every event marked published")
        container.get_wrapped_container().stop(timeout=30)  # SIGTERM, SIGKILL after 30 s
        exit_code = container.wait()
        logs = b"".join(container.get_logs()).decode()
    assert exit_code == 0, logs[-3000:]
    assert "stopping: finishing in-flight events" in logs
    assert unpublished(dsn) == 0
    REPORT.append(f"standalone: {len(lines)} messages read back from Kafka, exit code {exit_code} on SIGTERM")


def test_in_a_pod_the_relay_publishes_what_an_application_container_writes_in_order_per_order(
    image_builds: ImageBuilds, dsn: str, kafka: KafkaBroker, tmp_path: Path
) -> None:
    events, orders = 240, 12
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id text PRIMARY KEY, version int NOT NULL)")
    config, topic, port = _relay_config(tmp_path, dsn, kafka)
    app = Path(__file__).with_name("sidecar_app.py")
    name = f"outbox-relay-test-{uuid.uuid4().hex[:8]}"
    with pod(name):
        run_in_pod(name, f"{name}-relay", ["--volume", f"{config}:{CONFIG_IN_IMAGE}:ro"], image_tag())
        # The application starts once the relay is ready: its events flow while it writes.
        wait_for(lambda: _http_status(f"http://127.0.0.1:{port}/readyz") == 200, 60, "/readyz 200")
        run_in_pod(
            name,
            f"{name}-app",
            [
                *("--volume", f"{app}:/app/sidecar_app.py:ro", "--entrypoint", "python"),
                *("--env", f"DATABASE_URL={dsn}", "--env", f"EVENTS={events}", "--env", f"ORDERS={orders}"),
            ],
            image_tag(),
            "/app/sidecar_app.py",
        )
        assert podman("wait", f"{name}-app", timeout=120).stdout.strip() == "0", _logs(f"{name}-app")
        written = _event_ids(dsn)
        assert len(written) == events
        lines = _delivered(kafka, topic, written)
        wait_for(lambda: unpublished(dsn) == 0, 30, "every event marked published")
        podman("stop", "--time", "30", f"{name}-relay")
        relay_exit = podman("inspect", "--format", "{{.State.ExitCode}}", f"{name}-relay").stdout.strip()
        app_log, relay_log = _logs(f"{name}-app"), _logs(f"{name}-relay")
    assert relay_exit == "0", relay_log[-3000:]
    assert_complete_and_ordered(lines, written)
    _assert_versions_in_order(lines, orders, events // orders)
    REPORT.append(f"sidecar pod {name}: {len(lines)} messages read back from Kafka, relay exit {relay_exit}")
    REPORT.extend(f"  app   | {line}" for line in app_log.splitlines()[-2:])
    REPORT.extend(f"  relay | {line[:160]}" for line in relay_log.splitlines()[-4:])


def _event_ids(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {row[0] for row in conn.execute("SELECT event_id::text FROM outbox")}


def _logs(container: str) -> str:
    result = podman("logs", container, check=False)
    return result.stdout + result.stderr


def _assert_versions_in_order(lines: list[dict[str, Any]], orders: int, per_order: int) -> None:
    """Each order's messages carry the versions its business row went through, 1, 2, ... in
    order: the relay kept the application's commit order per aggregate."""
    versions: dict[str, list[int]] = {}
    delivered: set[str] = set()
    for line in lines:
        if line["event_id"] not in delivered:  # a repeat is at-least-once's right, not a reorder
            delivered.add(line["event_id"])
            versions.setdefault(line["aggregate_id"], []).append(line["payload"]["version"])
    assert len(versions) == orders
    for order_id, seen in versions.items():
        assert seen == list(range(1, per_order + 1)), f"{order_id}: versions {seen}"


def _step_output(build_output: str, marker: str) -> str:
    """What the build printed for the one step whose instruction contains `marker`."""
    steps = re.split(r"^(?=\[\d+/\d+\] STEP )", build_output, flags=re.MULTILINE)
    (step,) = [s for s in steps if marker in s.partition("\n")[0]]
    return step


def test_a_code_change_rebuilds_the_code_layer_and_keeps_the_dependency_layer(
    image_builds: ImageBuilds, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    for relative in [*build_context_files(), DOCKERFILE.name]:
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(DOCKERFILE.parent / relative, context / relative)
    with (context / "relay" / "__init__.py").open("a") as code:
        code.write(f"# changed: {uuid.uuid4()}\n")
    with temporary_build(context, "localhost/outbox-relay:code-change-test") as build:
        deps = _step_output(build.output, "--requirement")
        code_step = _step_output(build.output, "--no-deps")
        version = podman(
            "run", "--rm", "--no-healthcheck", "localhost/outbox-relay:code-change-test", "--version"
        )
    assert "--> Using cache" in deps, "the dependency layer was rebuilt for a code change"
    assert "--> Using cache" not in code_step, "the code layer came from the cache: no change seen"
    assert "Successfully installed outbox-relay" in code_step
    assert version.stdout.startswith("outbox-relay, version ")
    REPORT.append(f"rebuild after a code change: {build.describe()}, the dependency layer among them")
