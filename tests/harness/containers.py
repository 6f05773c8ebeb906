"""Test servers as containers, started with testcontainers' PostgreSQL, Kafka and RabbitMQ modules.

The harnesses (postgres.py, kafka.py, rabbitmq.py) ask :func:`wanted` whether their server should
be a container (see tests/harness/server_choice.py for the order and the ``RELAY_TEST_SERVERS``
switch), and if so call the matching ``start_*_container``. What these return is the harness's
own class, so tests cannot tell a container from another shared server, with one difference the
flags tell: a container is never ``owned`` (or ``controllable``). The harness does not pause,
stop or restart containers; a test that must is given a private process instead (the
``controlled_*`` fixtures in tests/conftest.py).

A container never outlives the run: ``close()`` removes it, an exit hook does the same if the
caller forgot, and a watchdog process removes it if the caller is killed outright (so it works
with testcontainers' Ryuk disabled, as it must be where Ryuk's image cannot be had).

Images come from ``RELAY_TEST_PG_IMAGE``, ``RELAY_TEST_KAFKA_IMAGE`` and
``RELAY_TEST_RABBITMQ_IMAGE``, else the defaults below; PostgreSQL runs with
``-c wal_level=logical`` and the harness's other settings.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any

from tests.harness.docker_engine import engine_address, engine_availability, image_availability
from tests.harness.kafka import KafkaBroker
from tests.harness.postgres import PostgresServer
from tests.harness.process import HOST, Watchdog
from tests.harness.rabbitmq import CONSISTENT_HASH_PLUGIN, RabbitBroker
from tests.harness.server_choice import Availability, Choice, choose, mode_from

__all__ = [
    "SERVERS",
    "choice_for",
    "start_kafka_container",
    "start_postgres_container",
    "start_rabbitmq_container",
    "wanted",
]


@dataclass(frozen=True)
class ServerSpec:
    label: str
    configured_by: str  # the environment variable naming a server to use as is
    image_variable: str
    default_image: str

    @property
    def image(self) -> str:
        return os.environ.get(self.image_variable) or self.default_image


SERVERS = {
    "postgres": ServerSpec("PostgreSQL", "RELAY_TEST_PG_DSN", "RELAY_TEST_PG_IMAGE", "postgres:16"),
    "kafka": ServerSpec(
        "Kafka", "KAFKA_BOOTSTRAP_SERVERS", "RELAY_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.1"
    ),
    "rabbitmq": ServerSpec("RabbitMQ", "RELAY_TEST_AMQP_URL", "RELAY_TEST_RABBITMQ_IMAGE", "rabbitmq:3.13"),
}

# The private cluster's settings that matter to the tests (tests/harness/postgres.py).
_POSTGRES_COMMAND = [
    "postgres",
    *("-c", "wal_level=logical", "-c", "max_replication_slots=20", "-c", "max_wal_senders=20"),
    *("-c", "max_connections=200", "-c", "fsync=off", "-c", "synchronous_commit=off"),
    *("-c", "full_page_writes=off"),
]


def choice_for(server: str) -> Choice:
    """Where ``server`` ("postgres", "kafka", "rabbitmq") comes from in this environment."""
    spec = SERVERS[server]
    configured = spec.configured_by if os.environ.get(spec.configured_by) else None
    return choose(
        spec.label,
        configured=configured,
        mode=mode_from(os.environ),
        engine=engine_availability,
        image=lambda: _images_available(spec.image),
    )


def wanted(server: str) -> bool:
    """Whether ``server`` should be a container (ServerChoiceError when the switch is bad, or
    insists on containers that cannot be had)."""
    return choice_for(server).kind == "container"


def _images_available(image: str) -> Availability:
    from testcontainers.core.config import testcontainers_config

    needed = [image] if testcontainers_config.ryuk_disabled else [image, testcontainers_config.ryuk_image]
    for name in needed:
        found = image_availability(name)
        if not found.ok:
            hint = " (or set TESTCONTAINERS_RYUK_DISABLED=true)" if name != image else ""
            return Availability(False, found.detail + hint)
    return image_availability(image)  # (remembered: no second look-up)


_REMOVE = (
    "import docker, sys;"
    " docker.DockerClient(base_url=sys.argv[1]).containers.get(sys.argv[2]).remove(force=True)"
)


class _Removal:
    """Removes a container at close, or from a watchdog if this process is killed first."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self._watchdog = Watchdog()
        container_id = container.get_wrapped_container().id
        self._watchdog.arm(commands=[[sys.executable, "-c", _REMOVE, engine_address(), container_id]])

    def remove(self) -> None:
        try:
            self.container.stop()
        finally:
            self._watchdog.disarm()


def _loopback_only(container: Any, port: int) -> None:
    """Publish ``port`` on the loopback interface only when the tests reach the engine's ports
    there: an engine on this machine (a unix socket), reached at its own address (not from
    inside another container through a gateway)."""
    from testcontainers.core.config import ConnectionMode

    local = engine_address().startswith("unix://")
    if local and container.get_docker_client().get_connection_mode() is ConnectionMode.docker_host:
        container.ports[str(port)] = (HOST,)


def _host(container: Any) -> str:
    host = str(container.get_container_host_ip())
    return HOST if host == "localhost" else host


def _started(container: Any, port: int) -> tuple[_Removal, str, int]:
    """Start the container; its removal, and the host and port clients reach ``port`` at."""
    try:
        container.start()
        host, exposed = _host(container), int(container.get_exposed_port(port))
    except BaseException:
        with contextlib.suppress(Exception):  # (a container that never started: nothing to remove)
            container.stop()
        raise
    return _Removal(container), host, exposed


# -- PostgreSQL -------------------------------------------------------------------------------


class PostgresContainerServer(PostgresServer):
    """A PostgreSQL container: a shared server for this run (``owned`` False), removed at close."""

    def __init__(self, dsn: str, port: int, removal: _Removal, image: str) -> None:
        super().__init__(dsn, owned=False, port=port)
        self._removal = removal
        self.image = image
        self._exit_hook.arm()

    def __repr__(self) -> str:
        return f"<PostgresServer container {self.image} {self.dsn}>"

    def close(self) -> None:
        if not self._closed:
            self._removal.remove()
        super().close()

    def _require_owned(self, action: str) -> None:
        raise RuntimeError(
            f"cannot {action} {self!r}: the harness does not control containers; a test that must"
            " asks for the controlled_pg fixture (a private process)"
        )


def start_postgres_container() -> PostgresServer:
    from testcontainers.community.postgres import PostgresContainer

    image = SERVERS["postgres"].image
    container = PostgresContainer(image, username="postgres", password="postgres", dbname="postgres")
    # Trust, as the private clusters do: the DSNs the tests hand around carry no password.
    container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust").with_command(_POSTGRES_COMMAND)
    _loopback_only(container, 5432)
    removal, host, port = _started(container, 5432)
    return PostgresContainerServer(f"postgresql://postgres@{host}:{port}/postgres", port, removal, image)


# -- Kafka ------------------------------------------------------------------------------------


class KafkaContainerBroker(KafkaBroker):
    """A Kafka container (KRaft mode): a shared broker for this run, removed at close."""

    shared_kind = "a Kafka container"
    private_hint = "a test that must pause or stop the broker asks for the controlled_kafka fixture"

    def __init__(self, bootstrap_servers: str, removal: _Removal) -> None:
        super().__init__(bootstrap_servers, owned=False)
        self._removal: _Removal | None = removal

    def close(self) -> None:
        removal, self._removal = self._removal, None
        if removal is not None:
            removal.remove()


def start_kafka_container() -> KafkaBroker:
    from testcontainers.community.kafka import KafkaContainer

    container = KafkaContainer(SERVERS["kafka"].image).with_kraft()
    _loopback_only(container, container.port)
    removal, host, port = _started(container, container.port)
    return KafkaContainerBroker(f"{host}:{port}", removal)


# -- RabbitMQ ---------------------------------------------------------------------------------


class RabbitContainerBroker(RabbitBroker):
    """A RabbitMQ container: a shared broker for this run (not ``controllable``), removed at close."""

    def __init__(self, url: str, removal: _Removal) -> None:
        super().__init__(url, owned=False)
        self._removal: _Removal | None = removal

    def __repr__(self) -> str:
        host, port = self._amqp_address()
        return f"<RabbitBroker container {host}:{port}>"

    def close(self) -> None:
        removal, self._removal = self._removal, None
        try:
            if removal is not None:
                removal.remove()
        finally:
            super().close()

    def _why_not_controllable(self) -> str:
        return "the harness does not control containers (start_rabbitmq(private=True) gives a private node)"


def start_rabbitmq_container() -> RabbitBroker:
    from testcontainers.community.rabbitmq import RabbitMqContainer

    container = RabbitMqContainer(SERVERS["rabbitmq"].image)
    _loopback_only(container, container.port)
    removal, host, port = _started(container, container.port)
    try:
        # The tests of the consistent-hash exchange need its plugin, which the image ships.
        enabled = container.exec(["rabbitmq-plugins", "enable", CONSISTENT_HASH_PLUGIN])
        if enabled.exit_code != 0:
            output = enabled.output.decode(errors="replace").strip()[-500:]
            raise RuntimeError(f"rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN} failed: {output}")
    except BaseException:
        removal.remove()
        raise
    return RabbitContainerBroker(f"amqp://guest:guest@{host}:{port}/%2F", removal)
