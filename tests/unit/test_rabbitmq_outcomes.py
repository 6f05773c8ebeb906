"""How the RabbitMQ sink reads a channel the broker closed: pure classification, no broker."""

from __future__ import annotations

import pytest

pytest.importorskip("pika")

from pika import exceptions as pe

from outbox_relay.connectors.sinks.rabbitmq.errors import refuses_the_relay


def test_a_channel_closed_with_access_refused_refuses_the_relay_and_other_closes_do_not() -> None:
    refused = pe.ChannelClosedByBroker(403, "ACCESS_REFUSED - access to exchange 'x' in vhost '/' refused")
    assert refuses_the_relay(refused)
    assert not refuses_the_relay(pe.ChannelClosedByBroker(404, "NOT_FOUND - no exchange 'x'"))
    assert not refuses_the_relay(pe.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"))
    assert not refuses_the_relay(pe.StreamLostError("Transport indicated EOF"))
