"""A loopback TCP proxy whose target can be switched, for tests of what clients see when the
server behind an address goes away or changes (a failover behind a virtual IP or DNS name), or
stops answering while its port still accepts connections (a hung server, a black-holing
firewall)."""

from __future__ import annotations

import contextlib
import socket
import threading

from outbox_relay.tools.drill_proxy import LoopbackProxy, close_socket
from tests.harness.process import HOST


class SwitchableProxy(LoopbackProxy):
    """Forwards connections to 127.0.0.1:`target`. `switch(port)` cuts every open connection and
    sends new ones to another port. `silence()` cuts every open connection and accepts new ones
    without ever forwarding or answering a byte. Threads only; `close()` stops them all."""

    def __init__(self, target: int) -> None:
        self._target_port: int | None = target
        super().__init__(HOST, thread_name="test-proxy")

    def switch(self, target: int) -> None:
        self._retarget(target)

    def silence(self) -> None:
        """From now on, connections are accepted and what they send is read and dropped: a
        server that hangs (or a firewall that drops packets) rather than one that is gone."""
        self._retarget(None)

    def _retarget(self, target: int | None) -> None:
        self._target_port = target
        self._cut_open()

    def _target(self) -> tuple[str, int] | None:
        return None if self._target_port is None else (HOST, self._target_port)

    def _take(self, client: socket.socket) -> None:
        if self._target_port is not None:
            super()._take(client)
            return
        self._track(client)
        threading.Thread(target=_swallow, args=(client,), daemon=True).start()


def _swallow(source: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while source.recv(65536):
            pass
    close_socket(source)


class HoldOneProxy(LoopbackProxy):
    """Forwards every connection to 127.0.0.1:`target`. `hold(port)` stops forwarding on the one
    connection whose end at the server has the local port `port` (the `client_port`
    PostgreSQL shows for its session in pg_stat_activity): from then on, what either end sends
    is read and dropped, and neither end is closed, not even when the other closes its own (a
    proxy or NAT that stopped relaying keeps both). Every other connection, and every new one,
    goes on. Threads only; `close()` stops them all."""

    def __init__(self, target: int) -> None:
        self._target_port = target
        self._held: set[int] = set()
        super().__init__(HOST, thread_name="test-hold-proxy")

    def hold(self, port: int) -> None:
        self._held.add(port)

    def _target(self) -> tuple[str, int] | None:
        return (HOST, self._target_port)

    def _take(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((HOST, self._target_port), timeout=5)
            upstream.settimeout(None)
        except OSError:
            close_socket(client)
            return
        port = upstream.getsockname()[1]
        self._track(client, upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._relay, args=(port, source, sink), daemon=True).start()

    def _relay(self, port: int, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if port not in self._held:
                    sink.sendall(data)
        if port in self._held:
            close_socket(source)  # (the other end stays open: nothing is forwarded, not even a close)
            return
        close_socket(source)
        close_socket(sink)
