"""Helpers for the per-sink integration tests: events, and publishing the way the pipeline does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from relay.events import OutboxEvent
from relay.interfaces import ConnectorError, Sink


def make_events(
    count: int, aggregates: int, start: int = 1, *, aggregate_type: str = "order"
) -> list[OutboxEvent]:
    return [
        OutboxEvent(
            position=i,
            event_id=str(uuid.uuid4()),
            aggregate_type=aggregate_type,
            aggregate_id=f"order-{i % aggregates}",
            event_type="OrderUpdated",
            payload=b'{"seq": %d, "text": "caf\xc3\xa9"}' % i,
            headers={"traceparent": f"00-trace-{i}-01", "correlation_id": "c-1"},
            created_at=1_700_000_000.25 + i,
        )
        for i in range(start, start + count)
    ]


async def relay_events(
    sink: Sink, events: list[OutboxEvent], *, batch: int, deadline_s: float = 30.0, pause_s: float = 0.2
) -> int:
    """Publish the way the pipeline does: at most one event per aggregate per call, the next
    event of an aggregate only after the previous one was acknowledged, failures retried after a
    pause. Returns how many event publications failed (a raising call counts all its events)."""
    lanes: dict[str | None, deque[OutboxEvent]] = {}
    for event in events:
        lanes.setdefault(event.aggregate_id, deque()).append(event)
    failed = 0
    deadline = time.monotonic() + deadline_s
    while any(lanes.values()):
        assert time.monotonic() < deadline, f"events still unacknowledged after {deadline_s:g}s"
        heads = [lane[0] for lane in lanes.values() if lane][:batch]
        try:
            results = await sink.publish(heads)
        except ConnectorError:
            failed += len(heads)
            await asyncio.sleep(pause_s)
            continue
        assert len(results) == len(heads)
        for event, result in zip(heads, results, strict=True):
            if result is None:
                lanes[event.aggregate_id].popleft()
            else:
                assert not result.permanent, f"a permanent failure during an outage: {result.reason}"
                failed += 1
        if any(result is not None for result in results):
            await asyncio.sleep(pause_s)
    return failed


def missing_extra_message(sink_config: dict[str, Any], module: str) -> str:
    """What building a relay with this sink says when `module` cannot be imported: run in a
    child process in which the module is made unimportable (sys.modules[name] = None)."""
    code = f"""
import sys
sys.modules[{module!r}] = None
from relay.config import parse_config
from relay.runner import SetupError, build_sink
config = parse_config({{"outboxes": [{{"name": "o", "source": {{"type": "postgres-polling", "dsn": "postgresql://x/y"}},
    "sink": {sink_config!r}}}]}}, "relay.yaml", {{}})
try:
    build_sink(config.outboxes[0], 0)
except SetupError as exc:
    print(exc)
else:
    print("built")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
