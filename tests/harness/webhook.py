"""A small HTTP receiver for webhook tests and benchmarks, on 127.0.0.1.

:class:`WebhookReceiver` runs an asyncio HTTP/1.1 server (keep-alive, Content-Length bodies) on
a loop in a thread of its own, so a test's own event loop (where the sink runs) stays free. It
records every request (method, path, lower-cased headers, body) before answering, and answers
200 unless told otherwise:

* ``script(Reply(500), Reply(429, retry_after="1"), ...)``: the next requests get these replies,
  in order, then 200 again;
* ``respond_with(fn)``: ``fn(request)`` returns the Reply for each request (None: the script or
  200), for example a 400 for one event id;
* ``Reply(delay=...)``: answer late (a timeout test);
* ``stop()`` / ``start()``: close the listening socket and every open connection (an outage),
  then listen again on the same port.

``python -m tests.harness.webhook [--port N]`` runs one as a process of its own (benchmarks: the
load generator then does not share a GIL with it); it prints ``listening <url>`` when ready and
answers ``GET /_stats`` with the number of requests and events received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.harness.process import HOST, ClosesOnExit

__all__ = ["Reply", "Request", "WebhookReceiver"]

_PHRASES = {
    200: "OK",
    202: "Accepted",
    204: "No Content",
    302: "Found",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # time.monotonic()


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: str | None = None
    delay: float = 0.0


class WebhookReceiver(ClosesOnExit):
    """See the module docstring. Use as a context manager, or call :meth:`close`."""

    def __init__(self, *, port: int = 0, record: bool = True, path: str = "/hook") -> None:
        self.record = record
        self.requests: list[Request] = []
        self.request_count = 0
        self.event_count = 0
        #: Requests received and not answered yet, and the most there ever were at once.
        self.in_flight = 0
        self.max_in_flight = 0
        self._path = path
        self._script: list[Reply] = []
        self._responder: Callable[[Request], Reply | None] | None = None
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{self._path}"

    # --- behaviour ------------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script.extend(replies)

    def respond_with(self, responder: Callable[[Request], Reply | None] | None) -> None:
        self._responder = responder

    def received(self) -> list[Request]:
        with self._lock:
            return list(self.requests)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (again, on the same port once one was chosen)."""
        if self._server is not None:
            return
        self._server = self._call(self._listen())
        sockets = self._server.sockets
        self.port = int(sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Stop listening and drop every open connection: requests now fail to connect."""
        server, self._server = self._server, None
        if server is not None:
            self._call(self._shutdown(server))

    def close(self) -> None:
        if not self._loop.is_closed():
            self.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    # --- internals ------------------------------------------------------------------------------

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._serve, HOST, self.port, reuse_address=True, backlog=1024)

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await server.wait_closed()

    def _reply_for(self, request: Request) -> Reply:
        responder = self._responder
        if responder is not None:
            reply = responder(request)
            if reply is not None:
                return reply
        with self._lock:
            if self._script:
                return self._script.pop(0)
        return Reply()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _version = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        # Header bytes are UTF-8 from the sink; decode them as such for tests.
                        headers[name.strip().lower()] = (
                            value.strip().encode("latin-1").decode("utf-8", "replace")
                        )
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                request = Request(method, path, headers, body, time.monotonic())
                if method == "GET" and path == "/_stats":
                    stats = json.dumps({"requests": self.request_count, "events": self.event_count}).encode()
                    await self._write(writer, Reply(200, stats, {"Content-Type": "application/json"}))
                    continue
                with self._lock:
                    self.request_count += 1
                    self.event_count += body.count(b'"idempotency_key":') or 1
                    if self.record:
                        self.requests.append(request)
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    reply = self._reply_for(request)
                    if reply.delay:
                        await asyncio.sleep(reply.delay)
                    await self._write(writer, reply)
                finally:
                    with self._lock:
                        self.in_flight -= 1
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _write(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        headers = {"Content-Length": str(len(reply.body)), **reply.headers}
        if reply.retry_after is not None:
            headers["Retry-After"] = reply.retry_after
        phrase = _PHRASES.get(reply.status, "Status")
        head = f"HTTP/1.1 {reply.status} {phrase}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(head.encode("latin-1") + b"\r\n" + reply.body)
        await writer.drain()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a webhook receiver that counts what it gets.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    receiver = WebhookReceiver(port=args.port, record=False)
    print(f"listening {receiver.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        receiver.close()


if __name__ == "__main__":
    main()
