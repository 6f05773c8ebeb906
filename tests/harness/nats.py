"""A real NATS server with JetStream for tests and benchmarks.

``start_nats()`` returns a :class:`NatsServer` that is one of

* an **external** server named by ``RELAY_TEST_NATS_URL`` (``owned`` False, never stopped by us);
* the **system server** answering on ``127.0.0.1:4222`` with JetStream enabled (``owned`` False);
* a **private server** (``owned`` True): Debian's ``nats-server`` with ``-js`` on a free loopback
  port, its JetStream store in a fresh temporary directory. It can be paused (SIGSTOP), resumed,
  stopped and started again on the same port with the same store: streams and their messages
  survive a restart (file storage).

``start_nats(private=True)`` always starts a private server (tests that stop or pause it).
Tests on a shared server use stream names and subjects of their own and delete their streams.

Facts seen with nats-server 2.9.10 (Debian 12): it answers ~20 ms after being spawned; SIGTERM
exits at once; the default duplicate window of a stream is 2 minutes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from tests.harness.process import HOST, Server, exchange, start_owned

__all__ = ["NATS_URL_ENV_VAR", "SYSTEM_URL", "NatsServer", "read_stream", "run_async", "start_nats"]

NATS_URL_ENV_VAR = "RELAY_TEST_NATS_URL"
SYSTEM_URL = "nats://127.0.0.1:4222"

T = TypeVar("T")


class NatsServer(Server):
    """A NATS server with JetStream for tests (see :class:`tests.harness.process.Server`)."""

    shared_kind = "a shared NATS server"
    private_hint = "use start_nats(private=True)"

    def delete_stream(self, name: str) -> None:
        async def delete() -> None:
            import nats
            from nats.js.errors import NotFoundError

            client = await nats.connect(self.url)
            try:
                try:
                    await client.jetstream().delete_stream(name)
                except NotFoundError:
                    pass
            finally:
                await client.close()

        run_async(delete)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh event loop in a thread of its own, so that sync
    helpers work from inside async tests (whose loop is already running)."""
    results: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(asyncio.run(_call(make)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def read_stream(url: str, stream: str) -> list[tuple[str, dict[str, str], bytes]]:
    """Every message stored in ``stream``, in sequence order: (subject, headers, data)."""

    async def read() -> list[tuple[str, dict[str, str], bytes]]:
        import nats

        client = await nats.connect(url)
        try:
            js = client.jetstream()
            info = await js.stream_info(stream)
            state = info.state
            messages: list[tuple[str, dict[str, str], bytes]] = []
            for seq in range(state.first_seq, state.last_seq + 1):
                try:
                    msg = await js.get_msg(stream, seq)
                except Exception:
                    continue  # deleted or trimmed
                assert msg.subject is not None, "a stored message keeps its subject"
                messages.append((msg.subject, dict(msg.headers or {}), msg.data or b""))
            return messages
        finally:
            await client.close()

    return run_async(read)


def _answers(url: str) -> bool:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return exchange(parts.hostname or HOST, parts.port or 4222, b"").startswith(b"INFO ")


def _jetstream_enabled(url: str) -> bool:
    async def probe() -> bool:
        import nats

        try:
            client = await nats.connect(
                url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False
            )
        except Exception:
            return False
        try:
            await client.jetstream().account_info()
            return True
        except Exception:
            return False
        finally:
            await client.close()

    return run_async(probe)


def _binary() -> str:
    found = shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None
    )
    if found is None:
        raise RuntimeError(
            "no nats-server binary: run tests/install-servers.sh (Debian package nats-server), "
            f"or set {NATS_URL_ENV_VAR} to a server with JetStream"
        )
    return found


def start_nats(
    *,
    private: bool = False,
    tmp_root: str | None = None,
    max_payload: int | None = None,
    config: str | None = None,
) -> NatsServer:
    """A NATS server with JetStream: ``RELAY_TEST_NATS_URL``, else the one on 127.0.0.1:4222 when it
    answers with JetStream, else (or with ``private``) a private one on a free port. With
    ``max_payload`` (bytes; the server's default is 1 MB) always a private one that takes
    messages that large; with ``config`` (text of a nats-server config file, for example an
    ``authorization`` block with users and permissions) always a private one that reads it."""
    if not private and max_payload is None and config is None:
        external = os.environ.get(NATS_URL_ENV_VAR)
        if external:
            if not _jetstream_enabled(external):
                raise RuntimeError(f"{NATS_URL_ENV_VAR}={external} is set but does not answer with JetStream")
            return NatsServer(external, owned=False)
        if _answers(SYSTEM_URL) and _jetstream_enabled(SYSTEM_URL):
            return NatsServer(SYSTEM_URL, owned=False)
    binary = _binary()

    def command(port: int, root: Path) -> list[str]:
        store = root / "jetstream"
        options = [binary, "-a", HOST, "-p", str(port), "-js", "-sd", str(store), "-n", f"relay-test-{port}"]
        if max_payload is not None or config is not None:  # (no command-line flag: a config file)
            path = root / "nats.conf"
            limit = f"max_payload: {max_payload}\n" if max_payload is not None else ""
            path.write_text(limit + (config or ""))
            options += ["-c", str(path)]
        return options

    process = start_owned("nats", command, lambda p: _answers(f"nats://{HOST}:{p}"), tmp_root=tmp_root)
    return NatsServer(f"nats://{HOST}:{process.port}", owned=True, process=process)
