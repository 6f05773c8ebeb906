"""The sink contract, run against the webhook sink, one request per event and in batches."""

from __future__ import annotations

import pytest

from outbox_relay.connectors.sinks.webhook import WebhookSink, WebhookSinkConfig
from outbox_relay.interfaces import Sink
from outbox_relay.testing.sink_contract import Lines, SinkBackend, SinkContract
from tests.conftest import webhook_request_as_lines
from tests.contract.proxy import REFUSING_PORT, behind_proxy, port_of, with_port
from tests.harness.webhook import WebhookReceiver


@pytest.fixture(params=["event", "batch"])
def sink_backend(request: pytest.FixtureRequest, webhook_receiver: WebhookReceiver) -> SinkBackend:
    def sink(url: str, timeout: float = 5) -> Sink:
        return WebhookSink(WebhookSinkConfig(type="webhook", url=url, mode=request.param, timeout=timeout))

    def read_back() -> Lines:
        # In arrival order: an aggregate's next event is sent only after the previous one was
        # answered, so each aggregate's events arrive in order.
        return [
            line for received in webhook_receiver.received() for line in webhook_request_as_lines(received)
        ]

    port = port_of(webhook_receiver.url)
    return SinkBackend(
        sink(webhook_receiver.url),
        read_back,
        # Port 1 on loopback refuses connections: every request fails to connect.
        lambda: sink(f"http://127.0.0.1:{REFUSING_PORT}/hook"),
        lambda: behind_proxy(port, lambda via: sink(with_port(webhook_receiver.url, via), 2), read_back),
    )


class TestWebhookSink(SinkContract):
    pass
