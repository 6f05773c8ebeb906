"""Outages for the contract suite: a server reached through a TCP proxy the test can cut (the
server itself is never stopped or reconfigured)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import Lines, Outage
from tests.harness.proxy import SwitchableProxy

#: Port 1 on loopback refuses connections.
REFUSING_PORT = 1


@contextmanager
def behind_proxy(port: int, sink: Callable[[int], Sink], read_back: Callable[[], Lines]) -> Iterator[Outage]:
    """An outage of the server on `port`: `sink(proxy_port)` builds a sink that reaches it
    through a proxy this test owns."""
    with SwitchableProxy(port) as proxy:
        yield Outage(
            sink(proxy.port),
            read_back,
            refuse=lambda: proxy.switch(REFUSING_PORT),
            silence=proxy.silence,
            restore=lambda: proxy.switch(port),
        )


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    return parts._replace(netloc=f"{host}:{port}").geturl()


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, f"{url} names no port"
    return port
