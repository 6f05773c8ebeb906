"""Events to test with, and waiting for a condition without blocking the event loop."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from outbox_relay.events import OutboxEvent


def random_event_id(_position: int) -> str:
    return str(uuid.uuid4())


def positional_event_id(position: int) -> str:
    """A UUID-shaped id that names the position, so that a failure message says which event."""
    return f"00000000-0000-0000-0000-{position:012d}"


def make_events(
    count: int,
    aggregates: int,
    start: int = 1,
    *,
    aggregate_type: str = "order",
    event_id: Callable[[int], str] = random_event_id,
    epoch: float = 1_700_000_000.25,
) -> list[OutboxEvent]:
    """Events at positions start.. over `aggregates` aggregates (position i belongs to
    `order-{i % aggregates}`), with a JSON payload that is not ASCII and two headers of their
    own; `event_id(position)` names each, `epoch` + position is its creation time."""
    return [
        OutboxEvent(
            position=i,
            event_id=event_id(i),
            aggregate_type=aggregate_type,
            aggregate_id=f"order-{i % aggregates}",
            event_type="OrderUpdated",
            payload=b'{"seq": %d, "text": "caf\xc3\xa9"}' % i,
            headers={"traceparent": f"00-trace-{i}-01", "correlation_id": "c-1"},
            created_at=epoch + i,
        )
        for i in range(start, start + count)
    ]


def as_line(headers: dict[str, str], body: bytes | None) -> dict[str, Any]:
    """A delivered message in the shape the contract suite reads back: the standard headers as
    fields (`position` as an int), every header under `headers`, the body as parsed JSON
    under `payload`."""
    line: dict[str, Any] = {
        name: headers[name]
        for name in ("event_id", "event_type", "aggregate_type", "aggregate_id", "created_at")
    }
    line["position"] = int(headers["position"])
    line["headers"] = headers
    line["payload"] = json.loads(body or b"null")
    return line


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (without blocking the event loop) until `condition()` holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        await asyncio.sleep(0.02)
