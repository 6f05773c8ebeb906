"""relay.outbox: what the producer helpers send to PostgreSQL (no server needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from outbox_relay.json_span import member_spans
from outbox_relay.outbox import _params, emit_event, message_content


class _Recorder:
    """Stands in for a psycopg connection: records what would be executed."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def execute(self, query: Any, params: Any) -> None:
        self.calls.append((query, params))


_TEXT = '{"a":123456789012345678901234567890, "price": 1.10, "n": 1e2,\n "s": "caf\\u00e9\\u0000"}'


@pytest.mark.parametrize("payload", [_TEXT, _TEXT.encode()])
def test_write_event_passes_json_text_through_unchanged(payload: str | bytes) -> None:
    _, params = _params("order", "o1", "Created", payload, None, "e-1")
    assert params[4] == _TEXT


def test_write_event_serializes_a_python_value_once_and_refuses_nan() -> None:
    _, params = _params("order", "o1", "Created", {"a": 10**30, "b": [1.5, None]}, None, "e-1")
    assert params[4] == '{"a":1000000000000000000000000000000,"b":[1.5,null]}'
    with pytest.raises(ValueError, match="not JSON compliant"):
        _params("order", "o1", "Created", {"a": float("nan")}, None, "e-1")


@pytest.mark.parametrize("payload", [_TEXT, _TEXT.encode()])
def test_emit_event_puts_the_payload_text_into_the_message_as_it_is(payload: str | bytes) -> None:
    conn = _Recorder()
    emit_event(conn, "order", "o1", "Created", payload, {"traceparent": "t"}, event_id="e-1")  # type: ignore[arg-type]
    content = conn.calls[0][1][1].encode()
    start, end = member_spans(content, ["payload"])["payload"]
    assert content[start:end] == _TEXT.encode()


def test_emit_event_refuses_a_payload_that_is_not_json() -> None:
    with pytest.raises(json.JSONDecodeError):
        emit_event(_Recorder(), "order", "o1", "Created", '{"a": 1.10', event_id="e-1")  # type: ignore[arg-type]


def test_message_content_splices_bytes_of_a_replayed_event() -> None:
    content = message_content("e-1", "order", "o1", "Created", b"[1.0, 2.50]", {"h": "v"})
    assert content.endswith(',"payload":[1.0, 2.50]}')
    start, end = member_spans(content.encode(), ["payload"])["payload"]
    assert content.encode()[start:end] == b"[1.0, 2.50]"
