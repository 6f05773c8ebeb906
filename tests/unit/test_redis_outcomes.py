"""How the Redis sink reads an error reply to one XADD: pure classification, no server."""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from outbox_relay.connectors.sinks.redis_streams import _reply_failure


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (NoPermissionError("this user has no permissions to run the 'xadd' command"), "NOPERM"),
        (AuthenticationError("Authentication required."), "NOAUTH"),
        (AuthenticationError("invalid username-password pair or user is disabled."), "WRONGPASS"),
        (ResponseError("NOPERM No permissions to access a key"), "NOPERM"),
    ],
)
def test_a_reply_refusing_the_relays_user_is_a_setup_failure_named_by_its_code(
    error: Exception, code: str
) -> None:
    failure = _reply_failure(error, "outbox.order")
    assert failure.setup
    assert failure.transient
    assert not failure.permanent
    assert code in failure.reason
    assert "outbox.order" in failure.reason


def test_a_key_of_another_type_stays_permanent_and_a_full_server_transient() -> None:
    wrong = _reply_failure(ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), "s")
    assert wrong.permanent
    assert not wrong.transient
    assert not wrong.setup
    full = _reply_failure(ResponseError("OOM command not allowed when used memory > 'maxmemory'"), "s")
    assert full.transient
    assert not full.permanent
    assert not full.setup
