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

FORWARD, HOLD, CUT = "forward", "hold", "cut"


class CutoffProxy:
    """Listens on 127.0.0.1 (`port`) and forwards each connection to (`host`, `target_port`)."""

    def __init__(self, host: str, target_port: int) -> None:
        self._target = (host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._mode = FORWARD
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._changed = threading.Condition()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="drill-proxy", daemon=True).start()

    @property
    def mode(self) -> str:
        return self._mode

    def forward(self) -> None:
        self._set(FORWARD)

    def hold(self) -> None:
        self._set(HOLD)

    def cut(self) -> None:
        self._set(CUT)
        with self._lock:
            cut, self._open = self._open, []
        for sock in cut:
            close_socket(sock)

    def close(self) -> None:
        self._closed = True
        close_socket(self._listener)
        self.cut()

    def __enter__(self) -> CutoffProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

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

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            if self._mode == CUT:
                close_socket(client)
                continue
            try:
                upstream = socket.create_connection(self._target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                close_socket(client)
                continue
            with self._lock:
                self._open += [client, upstream]
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


def close_socket(sock: socket.socket) -> None:
    """Shut down and close `sock`, whatever state it is in."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
