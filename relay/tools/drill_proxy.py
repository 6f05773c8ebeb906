"""A loopback TCP proxy that `drill` (and the tests) put between one relay and its database to
cut that relay off in the two ways networks fail:

- `cut()`: every connection is closed and new ones are refused at once, as when a network
  path goes down and the peer's stack says so (a reset, an unreachable host);
- `hold()`: every connection stays open and new ones are accepted, but not a byte is forwarded
  either way, as when a proxy, a NAT or a firewall stops relaying while keeping both ends:
  nothing fails, every wait just never ends;
- `forward()`: back to normal (connections cut or held stay as they are).

Threads only, so that it serves whichever event loop the relay and the caller use; `close()`
stops them all.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Self

FORWARD, HOLD, CUT = "forward", "hold", "cut"


class LoopbackProxy:
    """Listens on `listen_host` (`port`) and forwards each connection to the address
    `_target()` names at the time (a connection arriving while it names none is closed).

    Subclasses choose the target and when bytes flow (`_wait_forwarding`); `_cut_open()` closes
    every connection open now. Threads only; `close()` stops them all."""

    def __init__(self, listen_host: str = "127.0.0.1", thread_name: str = "proxy") -> None:
        self._listener = socket.create_server((listen_host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=thread_name, daemon=True).start()

    def _target(self) -> tuple[str, int] | None:
        raise NotImplementedError

    def _wait_forwarding(self) -> bool:
        """Whether to go on forwarding a connection's bytes (subclasses may block here)."""
        return not self._closed

    def close(self) -> None:
        self._closed = True
        close_socket(self._listener)
        self._cut_open()

    def _cut_open(self) -> None:
        with self._lock:
            cut, self._open = self._open, []
        for sock in cut:
            close_socket(sock)

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open += sockets

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            self._take(client)

    def _take(self, client: socket.socket) -> None:
        """Connect `client` to the target and pump both ways, or close it when there is none."""
        target = self._target()
        if target is None:
            close_socket(client)
            return
        try:
            upstream = socket.create_connection(target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            close_socket(client)
            return
        self._track(client, upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while self._wait_forwarding():
                data = source.recv(65536)
                # What arrived while the connection was being held is held too.
                if not data or not self._wait_forwarding():
                    break
                sink.sendall(data)
        close_socket(source)
        close_socket(sink)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class CutoffProxy(LoopbackProxy):
    """Listens on 127.0.0.1 (`port`) and forwards each connection to (`host`, `target_port`)
    until it is cut or held."""

    def __init__(self, host: str, target_port: int) -> None:
        self._address = (host, target_port)
        self._mode = FORWARD
        self._changed = threading.Condition()
        super().__init__(thread_name="drill-proxy")

    @property
    def mode(self) -> str:
        return self._mode

    def forward(self) -> None:
        self._set(FORWARD)

    def hold(self) -> None:
        self._set(HOLD)

    def cut(self) -> None:
        self._set(CUT)
        self._cut_open()

    def close(self) -> None:
        self._set(CUT)  # (a pump waiting on a held connection stops too)
        super().close()

    def _target(self) -> tuple[str, int] | None:
        return None if self._mode == CUT else self._address

    def _set(self, mode: str) -> None:
        with self._changed:
            self._mode = mode
            self._changed.notify_all()

    def _wait_forwarding(self) -> bool:
        """Block while connections are held; False once they are cut (stop pumping)."""
        with self._changed:
            while self._mode == HOLD:
                self._changed.wait()
            return self._mode == FORWARD and not self._closed


def close_socket(sock: socket.socket) -> None:
    """Shut down and close `sock`, whatever state it is in."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
