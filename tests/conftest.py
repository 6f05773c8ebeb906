"""Fixtures shared by the integration tests: a real PostgreSQL (private cluster with
wal_level=logical, a container, or RELAY_TEST_PG_DSN), one fresh database per test, a
Kafka-protocol broker (private tansu, a container, or KAFKA_BOOTSTRAP_SERVERS), and small helpers.
Where each server comes from: docs/test-servers.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness.kafka import BOOTSTRAP_ENV_VAR as KAFKA_ENV_VAR
from tests.harness.kafka import ConsumedMessage, KafkaBroker, start_kafka
from tests.harness.machine_servers import MachineServers, watch_machine_servers
from tests.harness.nats import NatsServer, start_nats
from tests.harness.postgres import DSN_ENV_VAR as PG_DSN_ENV_VAR
from tests.harness.postgres import PostgresServer, start_postgres
from tests.harness.rabbitmq import RabbitBroker, delete, start_rabbitmq
from tests.harness.redis import RedisServer, start_redis
from tests.harness.server_choice import ServerChoiceError, mode_from
from tests.harness.webhook import Request as WebhookRequest
from tests.harness.webhook import WebhookReceiver
from tests.support import REPO, create_outbox_database, start_relay

T = TypeVar("T")
StartRelay = Callable[..., subprocess.Popen[bytes]]


_MACHINE_WATCH = pytest.StashKey[MachineServers]()
_MACHINE_SERVERS_REPORT: list[str] = []


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Fingerprints the machine's own servers (PostgreSQL, RabbitMQ, NATS, Redis on their
    standard ports) before any test runs: once per run, in the process that runs or hands out
    the tests (not in each pytest-xdist worker)."""
    if not _is_xdist_worker(session.config):
        session.config.stash[_MACHINE_WATCH] = watch_machine_servers()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fails the run if any test stopped, restarted or reconfigured one of those servers: tests
    may only do that to servers they started (see tests/harness/machine_servers.py)."""
    watched = session.config.stash.get(_MACHINE_WATCH, None)
    if watched is None:
        return
    try:
        changes = watched.changes()
    finally:
        watched.close()
    if not changes:
        _MACHINE_SERVERS_REPORT.append(
            "the machine's own servers, left as they were: " + (", ".join(watched.watched) or "none ran")
        )
        return
    _MACHINE_SERVERS_REPORT.append(
        "the test run changed the machine's own servers:\n  " + "\n  ".join(changes)
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """A bad RELAY_TEST_SERVERS stops the run at once with one line, not every test with a trace."""
    try:
        mode_from(os.environ)
    except ServerChoiceError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _MACHINE_SERVERS_REPORT:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    with start_postgres() as server:
        yield server


def _outbox_database(server: PostgresServer) -> Iterator[str]:
    database = create_outbox_database(server)
    try:
        yield database
    finally:
        server.drop_database(database)


@pytest.fixture
def dsn(pg: PostgresServer) -> Iterator[str]:
    """A fresh database with the default outbox table, NOTIFY trigger included."""
    yield from _outbox_database(pg)


@pytest.fixture(scope="module")  # (not session: a module may have a `pg` or `kafka` of its own)
def controlled_pg(pg: PostgresServer) -> Iterator[PostgresServer]:
    """A PostgreSQL this run may stop, restart and reconfigure (see `controlled_postgres`)."""
    with controlled_postgres(pg) as server:
        yield server


def _controlled(
    shared: T, owned: bool, env_var: str, what: str, start_private: Callable[..., AbstractContextManager[T]]
) -> Iterator[T]:
    """`shared` when this run started it, else a private one of its own (the harness does not
    control a container); skips when `env_var` names a server the run must not touch."""
    if owned:
        yield shared
        return
    if os.environ.get(env_var):
        pytest.skip(f"needs {what} this test run started ({env_var} names another)")
    with start_private(private=True) as server:
        yield server


@contextmanager
def controlled_postgres(shared: PostgresServer) -> Iterator[PostgresServer]:
    """`shared` when it is a private cluster, else (a container, which the harness does not
    control) a private cluster of its own. Skips the test when RELAY_TEST_PG_DSN names the server:
    the tests never touch a server they did not start."""
    yield from _controlled(shared, shared.owned, PG_DSN_ENV_VAR, "a PostgreSQL", start_postgres)


@pytest.fixture
def controlled_dsn(controlled_pg: PostgresServer) -> Iterator[str]:
    """Like `dsn`, on `controlled_pg`."""
    yield from _outbox_database(controlled_pg)


@pytest.fixture
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outbox_relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(name="start_relay")
def start_relay_fixture(tmp_path: Path) -> Iterator[StartRelay]:
    """Starts `python -m relay run -c CONFIG [extra...]`, logging to tmp_path/relay-N.log (a broker
    outage logs a lot, and a full stderr pipe would stall the relay); kills what is left at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(config: Path, *extra: str) -> subprocess.Popen[bytes]:
        process: subprocess.Popen[bytes] = start_relay(
            config, *extra, log=tmp_path / f"relay-{len(started)}.log"
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker for the whole run: a private tansu, or KAFKA_BOOTSTRAP_SERVERS."""
    pytest.importorskip("confluent_kafka")
    with start_kafka() as broker:
        yield broker


@pytest.fixture(scope="module")
def controlled_kafka(kafka: KafkaBroker) -> Iterator[KafkaBroker]:
    """A Kafka-protocol broker this run may pause and stop: `kafka` when it is a private tansu,
    else (a container) a private tansu of its own; skips when KAFKA_BOOTSTRAP_SERVERS names one."""
    yield from _controlled(kafka, kafka.owned, KAFKA_ENV_VAR, "a broker", start_kafka)


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitBroker]:
    """RabbitMQ for the whole run: RELAY_TEST_AMQP_URL, the node on 127.0.0.1:5672, or a private node."""
    pytest.importorskip("pika")
    with start_rabbitmq() as broker:
        yield broker


def _as_line(headers: dict[str, str], body: bytes | None) -> dict[str, Any]:
    """A broker message in the shape of a file-sink line (`tests.support.read_lines`): the
    standard headers as fields, `position` as int, `headers` as str, `payload` parsed JSON."""
    line: dict[str, Any] = {
        name: headers[name]
        for name in ("event_id", "event_type", "aggregate_type", "aggregate_id", "created_at")
    }
    line["position"] = int(headers["position"])
    line["headers"] = headers
    line["payload"] = json.loads(body or b"null")
    return line


def rabbit_message_as_line(message: dict[str, Any]) -> dict[str, Any]:
    return _as_line({k: str(v) for k, v in message["headers"].items()}, message["body"])


def rabbit_delivered(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drained messages in the shape tests.support.assert_complete_and_ordered reads."""
    return [
        {
            "event_id": m["headers"]["event_id"],
            "aggregate_id": m["headers"]["aggregate_id"],
            "position": int(m["headers"]["position"]),
        }
        for m in messages
    ]


@dataclass
class RabbitNames:
    """Unique exchange and queue names for one test; everything is deleted afterwards."""

    prefix: str = field(default_factory=lambda: f"relaytest-{uuid.uuid4().hex[:10]}")
    queues: list[str] = field(default_factory=list)

    @property
    def exchange(self) -> str:
        return f"{self.prefix}.x"

    def queue(self, suffix: str = "q") -> str:
        name = f"{self.prefix}.{suffix}"
        self.queues.append(name)
        return name


def rabbit_names(url: str) -> Iterator[RabbitNames]:
    """For a `names` fixture: fresh names, and their queues and exchange deleted afterwards."""
    created = RabbitNames()
    try:
        yield created
    finally:
        delete(url, queues=created.queues, exchanges=[created.exchange])


def private_rabbitmq() -> Iterator[RabbitBroker]:
    """For a fixture of tests that stop the broker, enable a plugin or add users: a private node
    (never the machine's), or, where the rabbitmq-server package is missing, the shared broker,
    for which `require_control` skips those tests."""
    pytest.importorskip("pika")
    try:
        broker = start_rabbitmq(private=True)
    except RuntimeError:
        broker = start_rabbitmq()
    with broker:
        yield broker


def require_control(rabbit: RabbitBroker) -> None:
    """Skip the test unless it may stop and start this broker."""
    if not rabbit.controllable:
        pytest.skip(f"{rabbit!r} cannot be stopped and started from here")


def kafka_message_as_line(message: ConsumedMessage) -> dict[str, Any]:
    return _as_line(kafka_headers(message), message["value"])


def kafka_headers(message: ConsumedMessage) -> dict[str, str]:
    return {name: (value or b"").decode() for name, value in message["headers"]}


def consume_event_ids(
    kafka: KafkaBroker, topic: str, wanted: set[str], timeout: float, *, least_wait: float = 0.5
) -> list[ConsumedMessage]:
    """Every message on the topic, by (partition, offset), read until the `wanted` event ids are
    all there (duplicates included) or `timeout` passes; each read waits `least_wait` at least."""
    deadline = time.monotonic() + timeout
    expected = len(wanted)
    while True:
        messages = kafka.consume_all(topic, expected, max(deadline - time.monotonic(), least_wait))
        missing = wanted - {kafka_headers(m)["event_id"] for m in messages}
        if not missing or time.monotonic() >= deadline:
            return messages
        expected = len(messages) + len(missing)


# --- NATS, Redis, webhook (issue 8) --------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """NATS with JetStream for the whole run: RELAY_TEST_NATS_URL, the server on 127.0.0.1:4222,
    or a private nats-server. Tests use streams of their own and delete them."""
    pytest.importorskip("nats")
    with start_nats() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Redis for the whole run: RELAY_TEST_REDIS_URL, the server on 127.0.0.1:6379, or a private
    redis-server. Tests use keys of their own (tests.harness.redis.unique_prefix) and delete them."""
    pytest.importorskip("redis")
    with start_redis() as server:
        yield server


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A local HTTP receiver of the test's own (records requests; scripted 500s, 429s, delays)."""
    pytest.importorskip("httpx")
    with WebhookReceiver() as receiver:
        yield receiver


def nats_message_as_line(headers: dict[str, str], data: bytes) -> dict[str, Any]:
    return _as_line(headers, data)


def redis_entry_as_line(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A stream entry in the shape of a file-sink line; `headers` is the entry's JSON object."""
    headers = json.loads(fields[b"headers"])
    for name in ("event_id", "event_type", "aggregate_type", "aggregate_id", "position", "created_at"):
        assert headers[name] == fields[name.encode()].decode(), f"field {name} differs from its header"
    return _as_line(headers, fields[b"payload"])


def webhook_request_as_lines(request: WebhookRequest) -> list[dict[str, Any]]:
    """The events one webhook request carried, each in the shape of a file-sink line."""
    if request.headers.get("x-outbox-batch-size") is not None:
        lines = json.loads(request.body)
        for line in lines:
            assert line["idempotency_key"] == line["event_id"]
        return [_as_line(line["headers"], json.dumps(line["payload"]).encode()) for line in lines]
    headers = {
        name.removeprefix("x-outbox-").replace("-", "_"): value
        for name, value in request.headers.items()
        if name.startswith("x-outbox-") and not name.startswith("x-outbox-header-")
    }
    headers.update(
        {
            name.removeprefix("x-outbox-header-"): value
            for name, value in request.headers.items()
            if name.startswith("x-outbox-header-")
        }
    )
    assert request.headers["idempotency-key"] == headers["event_id"]
    return [_as_line(headers, request.body)]
