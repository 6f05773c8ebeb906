"""Proof that a test run leaves the machine's own servers exactly as it found them.

The machine may run PostgreSQL, RabbitMQ, NATS and Redis on their standard loopback ports for
other programs. Tests may use them (their own databases, queues, streams and keys, deleted
afterwards) but never stop, restart or reconfigure them: a test that must restart a server starts
its own. :func:`watch_machine_servers` takes a fingerprint of each server that answers at the
start of the run, and :meth:`MachineServers.changes` compares it with one taken at the end.

A fingerprint holds what a stop, a restart or a reconfiguration changes:

* PostgreSQL: the postmaster's start time, the time the configuration was last loaded, every
  setting not at its default (session-only sources excluded), and the roles (databases are not
  compared: other programs create and drop their own while the tests run);
* RabbitMQ: an AMQP connection held open for the whole run (``stop_app`` and a restart close it
  with ``CONNECTION_FORCED``), the node's enabled-plugins file, and its users and vhosts when
  ``rabbitmqctl`` may read them;
* NATS: the server's id, new on every start, and its announced settings;
* Redis: its ``run_id``, new on every start, and every ``CONFIG GET *`` value.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.process import HOST, port_accepts

#: The standard ports the machine's own servers answer on.
MACHINE_PORTS = {"postgres": 5432, "rabbitmq": 5672, "nats": 4222, "redis": 6379}

_ENABLED_PLUGINS = Path("/etc/rabbitmq/enabled_plugins")  # Debian's node: where plugins are enabled

# Settings whose value belongs to the session reading them, not to the server.
_SESSION_SOURCES = ("'default'", "'override'", "'client'", "'session'")

Fingerprint = dict[str, Any]


@dataclass
class MachineServers:
    """The machine's servers seen at the start of a run, and a way to tell what changed since."""

    ports: dict[str, int]
    before: dict[str, Fingerprint] = field(default_factory=dict)
    _rabbit_connection: Any = None

    @property
    def watched(self) -> list[str]:
        return sorted(self.before)

    def changes(self) -> list[str]:
        """One line per difference between the start of the run and now (empty: untouched)."""
        found: list[str] = []
        if self._rabbit_connection is not None:
            found += _rabbit_connection_lost(self._rabbit_connection)
        after = _fingerprints({server: self.ports[server] for server in self.before})
        for server, was in self.before.items():
            now = after.get(server)
            if now is None:
                found.append(f"{server}: no longer answers")
                continue
            for key in sorted(set(was) | set(now)):
                if was.get(key) != now.get(key):
                    found.append(f"{server}: {key} was {was.get(key)!r}, now {now.get(key)!r}")
        return found

    def close(self) -> None:
        if self._rabbit_connection is not None:
            with contextlib.suppress(Exception):
                self._rabbit_connection.close()
            self._rabbit_connection = None


def watch_machine_servers(ports: dict[str, int] | None = None) -> MachineServers:
    """Fingerprint every server answering on its port (default: the machine's standard ports;
    none answering: none watched), and hold an AMQP connection to RabbitMQ open until
    :meth:`MachineServers.close`."""
    watched = MachineServers(dict(ports or MACHINE_PORTS))
    watched.before = _fingerprints(watched.ports)
    if "rabbitmq" in watched.before:
        watched._rabbit_connection = _open_amqp(watched.ports["rabbitmq"])
    return watched


def _fingerprints(ports: dict[str, int]) -> dict[str, Fingerprint]:
    seen: dict[str, Fingerprint] = {}
    for server, port in ports.items():
        if not port_accepts(HOST, port):
            continue
        with contextlib.suppress(Exception):  # a server that does not answer the reader: unwatched
            seen[server] = _READERS[server](port)
    return seen


def _postgres(port: int) -> Fingerprint:
    import psycopg

    dsn = f"host={HOST} port={port} dbname=postgres user=postgres connect_timeout=5"
    with psycopg.connect(dsn, autocommit=True) as conn:

        def rows(query: str) -> list[Any]:
            return [row[0] for row in conn.execute(query).fetchall()]

        return {
            "started": str(conn.execute("SELECT pg_postmaster_start_time()").fetchone()),
            "configuration loaded": str(conn.execute("SELECT pg_conf_load_time()").fetchone()),
            "settings": rows(
                "SELECT name || '=' || setting FROM pg_settings"
                f" WHERE source NOT IN ({', '.join(_SESSION_SOURCES)}) ORDER BY name"
            ),
            "roles": rows("SELECT rolname FROM pg_roles ORDER BY 1"),
        }


def _rabbitmq(port: int) -> Fingerprint:
    # rabbitmqctl reads the node of this machine (Debian's wrapper); a node on another port is
    # watched through its AMQP connection alone.
    if port != MACHINE_PORTS["rabbitmq"]:
        return {"answers": True}
    fingerprint: Fingerprint = {"answers": True}
    with contextlib.suppress(OSError):  # (rabbitmq-plugins would take seconds to say the same)
        fingerprint["enabled plugins file"] = _ENABLED_PLUGINS.read_text()
    control = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    for key, command in (
        ("users", [control, "-q", "list_users"]),
        ("vhosts", [control, "-q", "list_vhosts"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                fingerprint[key] = sorted(done.stdout.split())
    return fingerprint


def _open_amqp(port: int) -> Any:
    try:
        import pika
    except ImportError:
        return None
    with contextlib.suppress(Exception):
        url = f"amqp://guest:guest@{HOST}:{port}/%2F?heartbeat=0"
        return pika.BlockingConnection(pika.URLParameters(url))
    return None


def _rabbit_connection_lost(connection: Any) -> list[str]:
    try:
        connection.process_data_events(time_limit=0)
    except Exception as exc:
        return [f"rabbitmq: the connection held since the start was closed ({exc!r})"]
    return [] if connection.is_open else ["rabbitmq: the connection held since the start was closed"]


def _nats(port: int) -> Fingerprint:
    with socket.create_connection((HOST, port), timeout=5) as conn:
        line = conn.makefile("rb").readline(1 << 16).decode()
    assert line.startswith("INFO "), line
    info = json.loads(line[5:])
    announced = ("server_id", "version", "jetstream", "max_payload", "auth_required", "tls_required")
    return {key: info.get(key) for key in announced}


def _redis(port: int) -> Fingerprint:
    import redis

    client = redis.Redis(host=HOST, port=port, socket_timeout=5)
    try:
        return {
            "run_id": client.info("server")["run_id"],
            "config": dict(sorted(client.config_get("*").items())),
        }
    finally:
        client.close()


_READERS: dict[str, Callable[[int], Fingerprint]] = {
    "postgres": _postgres,
    "rabbitmq": _rabbitmq,
    "nats": _nats,
    "redis": _redis,
}
