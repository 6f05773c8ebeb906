"""A loopback TCP proxy whose target can be switched, for tests of what clients see when the
server behind an address goes away or changes (a failover behind a virtual IP or DNS name), or
stops answering while its port still accepts connections (a hung server, a black-holing
firewall)."""

from __future__ import annotations

import contextlib
import socket
import threading

from outbox_relay.drill_proxy import close_socket
from tests.harness.process import HOST


class SwitchableProxy:
    """Forwards connections to 127.0.0.1:`target`. `switch(port)` cuts every open connection and
    sends new ones to another port. `silence()` cuts every open connection and accepts new ones
    without ever forwarding or answering a byte. Threads only; `close()` stops them all."""

    def __init__(self, target: int) -> None:
        self._target: int | None = target
        self._listener = socket.create_server((HOST, 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="test-proxy", daemon=True).start()

    def switch(self, target: int) -> None:
        self._retarget(target)

    def silence(self) -> None:
        """From now on, connections are accepted and what they send is read and dropped: a
        server that hangs (or a firewall that drops packets) rather than one that is gone."""
        self._retarget(None)

    def _retarget(self, target: int | None) -> None:
        self._target = target
        with self._lock:
            cut, self._open = self._open, []
        for sock in cut:
            close_socket(sock)

    def close(self) -> None:
        close_socket(self._listener)
        self._retarget(self._target)

    def __enter__(self) -> SwitchableProxy:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            target = self._target
            if target is None:
                with self._lock:
                    self._open.append(client)
                threading.Thread(target=_swallow, args=(client,), daemon=True).start()
                continue
            try:
                upstream = socket.create_connection((HOST, target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                close_socket(client)
                continue
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    close_socket(source)
    close_socket(sink)


def _swallow(source: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while source.recv(65536):
            pass
    close_socket(source)
