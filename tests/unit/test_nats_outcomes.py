"""How the NATS sink recognises the server refusing the relay's user: pure, no server."""

from __future__ import annotations

import pytest

pytest.importorskip("nats")

from outbox_relay.connectors.sinks.nats import permissions_violation


def test_a_permissions_violation_is_recognised_in_either_wording_with_its_operation_and_subject() -> None:
    lower = Exception('nats: permissions violation for publish to "denied.order"')
    title = Exception('nats: Permissions Violation for Subscription to "_INBOX.relay.abc.*"')
    assert permissions_violation(lower) == ("publish", "denied.order")
    assert permissions_violation(title) == ("subscription", "_INBOX.relay.abc.*")
    assert permissions_violation(Exception("nats: stale connection")) is None
    assert permissions_violation(None) is None
