"""One small HTTP endpoint for operators: /metrics (Prometheus), /healthz (alive), /readyz.

/healthz is the liveness probe: 503 when a call is hung (relay.stalls), and no answer at all when
the event loop is blocked or the process frozen, since it is answered on that loop.

Written on asyncio streams rather than a web framework: three read-only routes do not justify
a dependency, and the server must share the relay's event loop to read its state without locks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

#: () -> (ok, details for the JSON body): what /readyz and /healthz answer.
Probe = Callable[[], tuple[bool, dict[str, object]]]


def _alive() -> tuple[bool, dict[str, object]]:
    return True, {}


class HealthServer:
    def __init__(self, host: str, port: int, readiness: Probe, liveness: Probe = _alive) -> None:
        self._host, self._port = host, port
        self._readiness = readiness
        self._liveness = liveness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as an ephemeral port)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, ctype, body = self._route(parts[0] if parts else "", path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest()
        if path == "/healthz":
            alive, detail = self._liveness()
            if alive:
                return "200 OK", "application/json", b'{"status":"alive"}\n'
            body = json.dumps({"status": "stuck", **detail}).encode() + b"\n"
            return "503 Service Unavailable", "application/json", body
        if path == "/readyz":
            ready, detail = self._readiness()
            body = json.dumps({"ready": ready, **detail}).encode() + b"\n"
            return ("200 OK" if ready else "503 Service Unavailable"), "application/json", body
        return "404 Not Found", "text/plain", b"not found\n"
