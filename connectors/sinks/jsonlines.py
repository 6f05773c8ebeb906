"""The JSON-lines message format shared by the `stdout` and `file` sinks.

One line per event: the event's metadata, every header of docs/concepts/payloads.md (the row's
own headers included) and the payload. A JSON payload is embedded as JSON, byte for byte, except that a raw
line break in it (CR or LF, which JSON allows only as whitespace between tokens, never inside a
string) becomes a space, so that one event stays one line; any other payload is embedded as a
string (text) or base64 (`payload_base64`).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import orjson

from outbox_relay.events import OutboxEvent


def encode_line(event: OutboxEvent) -> bytes:
    created_at = event.created_at_iso
    meta = orjson.dumps(
        {
            "event_id": event.event_id,
            "event_type": event.event_type,
            "aggregate_type": event.aggregate_type,
            "aggregate_id": event.aggregate_id,
            "position": event.position,
            "created_at": created_at,
            "headers": event.standard_headers(created_at),
        }
    )
    ctype = event.content_type
    if ctype == "application/json":
        payload = event.payload
        if b"\n" in payload or b"\r" in payload:
            # A `json` column keeps the writer's line breaks; one event must stay one line.
            payload = payload.replace(b"\n", b" ").replace(b"\r", b" ")
        return meta[:-1] + b',"payload":' + payload + b"}\n"
    if ctype.startswith("text/"):
        text = orjson.dumps(event.payload.decode("utf-8", "replace"))
        return meta[:-1] + b',"payload":' + text + b"}\n"
    encoded = base64.b64encode(event.payload)
    return meta[:-1] + b',"payload_base64":"' + encoded + b'"}\n'


def encode_lines(events: Sequence[OutboxEvent]) -> bytes:
    return b"".join([encode_line(e) for e in events])
