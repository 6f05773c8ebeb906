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
import tempfile
import uuid
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from tests.harness.process import HOST, OwnedProcess, StartError, exchange, pick_port

__all__ = ["REDIS_URL_ENV_VAR", "SYSTEM_URL", "RedisServer", "start_redis", "unique_prefix"]

REDIS_URL_ENV_VAR = "RELAY_TEST_REDIS_URL"
SYSTEM_URL = "redis://127.0.0.1:6379/0"
_START_ATTEMPTS = 5


def unique_prefix(name: str = "test") -> str:
    return f"relay-{name}-{uuid.uuid4().hex[:12]}"


class RedisServer:
    """A Redis server for tests. ``url`` for clients; ``owned`` True when this object started it
    (only then do :meth:`pause`, :meth:`resume`, :meth:`stop` and :meth:`start` work)."""

    def __init__(self, url: str, *, owned: bool, process: OwnedProcess | None = None) -> None:
        self.url = url
        self.owned = owned
        self._process = process

    def __repr__(self) -> str:
        return f"<RedisServer {'private' if self.owned else 'shared'} {self.url}>"

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def client(self) -> object:
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

    def pause(self) -> None:
        self._owned("pause").pause()

    def resume(self) -> None:
        self._owned("resume").resume()

    def stop(self) -> None:
        self._owned("stop").stop()

    def start(self) -> None:
        self._owned("start").spawn()

    def close(self) -> None:
        if self._process is not None:
            self._process.close()

    def _owned(self, action: str) -> OwnedProcess:
        if self._process is None:
            raise RuntimeError(f"cannot {action} a shared Redis ({self.url}); use start_redis(private=True)")
        return self._process


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
    last: StartError | None = None
    for _attempt in range(_START_ATTEMPTS):
        root = Path(tempfile.mkdtemp(prefix="relay-redis-", dir=tmp_root)).resolve()
        port = pick_port()

        def command(port: int, root: Path = root) -> list[str]:
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

        process = OwnedProcess("redis-server", command, lambda p: _answers(f"redis://{HOST}:{p}"), root, port)
        try:
            process.spawn()
        except StartError as exc:
            process.close()
            last = exc
            if exc.address_in_use:
                continue
            raise
        return RedisServer(f"redis://{HOST}:{port}/0", owned=True, process=process)
    assert last is not None
    raise last
