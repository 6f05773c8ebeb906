"""A real Redis server for tests and benchmarks.

``start_redis()`` returns a :class:`RedisServer` that is one of

* an **external** server named by ``RELAY_TEST_REDIS_URL`` (``owned`` False, never stopped by us);
* the **system server** answering PING on ``127.0.0.1:6379`` (``owned`` False);
* a **private server** (``owned`` True): Debian's ``redis-server`` on a free loopback port with
  ``--save "" --appendonly no`` (nothing on disk, a restart starts empty), or with
  ``persistent=True`` an append-only file fsynced on every write (``--appendonly yes
  --appendfsync always``), so that what Redis acknowledged survives a stop and a start.

``start_redis(private=True)`` always starts a private server (tests that stop or pause it).
Tests on a shared server use keys of their own (``unique_prefix()``) and delete them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from tests.harness.process import HOST, Server, exchange, start_owned

if TYPE_CHECKING:
    import redis

__all__ = [
    "REDIS_URL_ENV_VAR",
    "SYSTEM_URL",
    "RedisServer",
    "start_redis",
    "stream_entries",
    "unique_prefix",
]

REDIS_URL_ENV_VAR = "RELAY_TEST_REDIS_URL"
SYSTEM_URL = "redis://127.0.0.1:6379/0"


def unique_prefix(name: str = "test") -> str:
    return f"relay-{name}-{uuid.uuid4().hex[:12]}"


class RedisServer(Server):
    """A Redis server for tests (see :class:`tests.harness.process.Server`)."""

    shared_kind = "a shared Redis"
    private_hint = "use start_redis(private=True)"

    def client(self) -> redis.Redis:
        """A synchronous redis-py client (the caller closes it)."""
        import redis

        return redis.Redis.from_url(self.url)

    def delete_matching(self, pattern: str) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def stream_entries(url: str, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of the stream ``key`` as (id, fields), oldest first; none for a missing key."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        # redis-py types its replies for either decode_responses setting; without it, as here,
        # ids, field names and values are all bytes.
        return cast("list[tuple[bytes, dict[bytes, bytes]]]", client.xrange(key))
    finally:
        client.close()


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    return exchange(parts.hostname or HOST, parts.port or 6379, b"PING\r\n").startswith(b"+PONG")


def _binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no redis-server binary: run tests/install-servers.sh (Debian package redis-server), "
            f"or set {REDIS_URL_ENV_VAR}"
        )
    return found


def start_redis(
    *, private: bool = False, persistent: bool = False, tmp_root: str | None = None
) -> RedisServer:
    """A Redis server: ``RELAY_TEST_REDIS_URL``, else the one on 127.0.0.1:6379 when it answers
    PING, else (or with ``private`` or ``persistent``) a private one on a free port."""
    if not private and not persistent:
        external = os.environ.get(REDIS_URL_ENV_VAR)
        if external:
            import redis

            try:
                redis.Redis.from_url(external, socket_connect_timeout=5).ping()
            except Exception as exc:
                raise RuntimeError(
                    f"{REDIS_URL_ENV_VAR}={external} is set but does not answer: {exc}"
                ) from None
            return RedisServer(external, owned=False)
        if _answers(SYSTEM_URL):
            return RedisServer(SYSTEM_URL, owned=False)
    binary = _binary()
    persistence = (
        ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if persistent
        else ["--save", "", "--appendonly", "no"]
    )

    def command(port: int, root: Path) -> list[str]:
        return [
            binary,
            "--port",
            str(port),
            "--bind",
            HOST,
            "--dir",
            str(root),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            *persistence,
        ]

    process = start_owned("redis", command, lambda p: _answers(f"redis://{HOST}:{p}"), tmp_root=tmp_root)
    return RedisServer(f"redis://{HOST}:{process.port}/0", owned=True, process=process)
