"""What the webhook sink sends: the headers of an event's request (`mode: event`), the JSON array
body and the idempotency key of a batch (`mode: batch`). Pure."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import orjson

from outbox_relay.connectors.sinks.jsonlines import encode_line
from outbox_relay.events import OutboxEvent

HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP header name (RFC 9110 token)
#: What no header value may hold (it would end the header, or the request).
BAD_VALUE = re.compile(r"[\r\n\x00]")
_STANDARD = {
    "event_id": "X-Outbox-Event-Id",
    "event_type": "X-Outbox-Event-Type",
    "aggregate_type": "X-Outbox-Aggregate-Type",
    "aggregate_id": "X-Outbox-Aggregate-Id",
    "position": "X-Outbox-Position",
    "created_at": "X-Outbox-Created-At",
}
ROW_HEADER_PREFIX = "X-Outbox-Header-"
_TRACE_CONTEXT = ("traceparent", "tracestate")


def event_headers(event: OutboxEvent) -> dict[str, bytes] | str:
    """The per-event request headers, or why the event's headers cannot be sent over HTTP.
    Values are UTF-8 bytes: HTTP allows octets above 0x7f, so non-ASCII values pass unchanged."""
    created_at = event.created_at_iso
    headers: dict[str, bytes] = {
        "Content-Type": event.content_type.encode(),
        "Idempotency-Key": event.event_id.encode(),
    }
    for name, value in event.standard_headers(created_at).items():
        if BAD_VALUE.search(value):
            return f"header {name!r} has a line break or NUL in its value, which HTTP cannot carry"
        standard = _STANDARD.get(name)
        if standard is not None:
            headers[standard] = value.encode()
            continue
        if not HEADER_NAME.match(name):
            return f"header name {name!r} is not a valid HTTP header name"
        headers[ROW_HEADER_PREFIX + name] = value.encode()
        if name.lower() in _TRACE_CONTEXT:
            headers[name.lower()] = value.encode()
    return headers


def batch_body(events: Sequence[OutboxEvent]) -> bytes:
    """A JSON array with one object per event: the file sink's line plus `idempotency_key`."""
    parts = [b'{"idempotency_key":' + orjson.dumps(e.event_id) + b"," + encode_line(e)[1:-1] for e in events]
    return b"[" + b",".join(parts) + b"]"


def batch_key(events: Sequence[OutboxEvent]) -> str:
    """The same events always get the same key, so a re-sent batch is recognisable as such."""
    digest = hashlib.sha256("\n".join(e.event_id for e in events).encode()).hexdigest()
    return f"batch-{digest}"


def batch_headers(events: Sequence[OutboxEvent]) -> dict[str, bytes]:
    """The headers of a batch's request."""
    return {
        "Content-Type": b"application/json",
        "Idempotency-Key": batch_key(events).encode(),
        "X-Outbox-Batch-Size": str(len(events)).encode(),
    }
