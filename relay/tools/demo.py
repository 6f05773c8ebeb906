"""`outbox-relay demo`: an embedded PostgreSQL (or --dsn), orders going through their lifecycle
written into the outbox, relayed to a file sink that the demo reads back. It shows a few of
the events and a progress line; on Ctrl-C or after --duration it stops writing, drains (waits
until everything written is published), checks what the sink received against what was
written, and prints the summary: exit 0 only when nothing was lost or out of order."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import psycopg

from outbox_relay.assembly import build_pipeline
from outbox_relay.config import RelayConfig, parse_config
from outbox_relay.config.errors import ConfigError
from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig, JsonLinesTail
from outbox_relay.events import OutboxEvent, PublishResult
from outbox_relay.logs import configure_logging
from outbox_relay.pipeline import Pipeline
from outbox_relay.progress import Fields, RateMeter, showing
from outbox_relay.runner import Relay, set_up_database
from outbox_relay.secrets import scrubber
from outbox_relay.tools.demo_check import DemoSummary, SinkTally, summarize
from outbox_relay.tools.demo_orders import (
    DEMO_DEAD_LETTERS,
    DEMO_OUTBOX,
    DEMO_OUTBOX_CHANNEL,
    Written,
    write_orders,
)

#: Events shown as they arrive (those of the first orders seen); the rest is only counted.
SAMPLE_ORDERS = 2
#: How long the drain may take before the demo gives up and reports what is missing as lost.
DRAIN_TIMEOUT = 60.0
_OLDEST_UNPUBLISHED = (
    f"SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8 FROM {DEMO_OUTBOX}"
    " WHERE published_at IS NULL AND headers->>'demo_run' = %s"
)
_UNPUBLISHED = f"SELECT count(*) FROM {DEMO_OUTBOX} WHERE published_at IS NULL AND headers->>'demo_run' = %s"


def _embedded_postgres() -> tuple[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR in containers
            import pgserver
    except ImportError:
        print(
            "outbox-relay demo: the embedded PostgreSQL needs: pip install 'outbox-relay[demo]'"
            " (or pass --dsn)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    data_dir = tempfile.mkdtemp(prefix="outbox-relay-demo-")
    # A Ctrl-C while the server starts would leave it running with nobody to stop it: it is
    # taken when the server is up (and then stops it).
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _: interrupted.append(signum))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(data_dir, cleanup_mode="delete")  # type: ignore[attr-defined]
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        server.cleanup()
        raise KeyboardInterrupt
    return str(server.get_uri()), server


class _DroppingFileSink(FileSink):
    """A broken sink for the demo's own test: it acknowledges every `every`-th event without
    writing it, which the read-back must report as lost."""

    def __init__(self, config: FileSinkConfig, every: int) -> None:
        super().__init__(config)
        self._every, self._seen = every, 0

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        kept = []
        for event in events:
            self._seen += 1
            if self._seen % self._every:
                kept.append(event)
        if kept:
            await super().publish(kept)
        return [None] * len(events)


def _config(dsn: str, sink_path: str) -> RelayConfig:
    outbox: dict[str, Any] = {
        "name": "orders",
        # (A channel of its own: an application's relay on the same database is not woken.)
        "source": {
            "type": "postgres-polling",
            "dsn": dsn,
            "table": DEMO_OUTBOX,
            "notify_channel": DEMO_OUTBOX_CHANNEL,
        },
        "sink": {"type": "file", "path": sink_path},
        "dead_letter": {"table": DEMO_DEAD_LETTERS},
        "lease": {"enabled": False},  # (one process: no lease row in the application's lease table)
    }
    settings = {"outboxes": [outbox], "http": {"port": 0}, "log": {"format": "console", "level": "warning"}}
    return parse_config(settings, file="(demo)")


def _pipeline(config: RelayConfig, drop_every: int) -> Pipeline:
    outbox = config.outboxes[0]
    assert isinstance(outbox.sink, FileSinkConfig)
    sink = _DroppingFileSink(outbox.sink, drop_every) if drop_every else FileSink(outbox.sink)
    return build_pipeline(outbox, 0, sink)


class _Demo:
    """One run: what was written, what the sink received, and the stop requests."""

    def __init__(self, dsn: str, sink_path: str, relay: Relay) -> None:
        self.dsn, self.relay = dsn, relay
        run_id = uuid.uuid4().hex[:6]
        self.written, self.tally = Written(run_id), SinkTally(run_id)
        self.tail = JsonLinesTail(sink_path)
        self.stop_writing, self.give_up = asyncio.Event(), asyncio.Event()
        self.meter = RateMeter()
        self.started = time.monotonic()
        self._sample_orders: list[str] = []

    def on_signal(self) -> None:
        """Ctrl-C (or SIGTERM): stop writing and drain; a second one: stop draining."""
        if self.stop_writing.is_set():
            self.give_up.set()
        self.stop_writing.set()

    def read_sink(self) -> None:
        for line in self.tally.add(self.tail.read()):
            order_id = line["aggregate_id"]
            if order_id not in self._sample_orders and len(self._sample_orders) < SAMPLE_ORDERS:
                self._sample_orders.append(order_id)
            if order_id in self._sample_orders:
                payload = line["payload"]
                print(
                    f"  {order_id:<16} #{payload['sequence']} {line['event_type']:<15}"
                    f" position={line['position']}  amount={payload['amount']:.2f}",
                    flush=True,
                )

    def counts(self, phase: str) -> dict[str, object]:
        return {"phase": phase, "written": len(self.written.events), "published": len(self.tally.received)}

    async def measure(self) -> Fields:
        published = len(self.tally.received)
        phase = "draining" if self.stop_writing.is_set() else "writing"
        return {**self.counts(phase), "rate": f"{self.meter.rate(published):.0f}/s", "lag": await self._lag()}

    async def _lag(self) -> str:
        """Age of the oldest event of this run not published yet, read on a connection of the
        demo's own (never the relay's: the progress line must not open or keep its sessions)."""
        try:
            async with await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=2
            ) as conn:
                row = await (await conn.execute(_OLDEST_UNPUBLISHED, (self.written.run_id,))).fetchone()
        except psycopg.Error:  # the database is away for a moment: the line goes on
            return "?"
        return f"{float(row[0]):.2f}s" if row and row[0] is not None else "0.00s"

    async def follow(self) -> None:
        while True:
            self.read_sink()
            await asyncio.sleep(0.2)  # (a cadence, not a retry)

    async def drain(self) -> list[str]:
        """Wait until the sink holds every written event, or the database says the relay
        published them all (whatever the sink lacks then is lost); notes on why it stopped short."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            while True:
                self.read_sink()
                if self.written.events.keys() <= self.tally.received.keys():
                    return []
                row = await (await conn.execute(_UNPUBLISHED, (self.written.run_id,))).fetchone()
                if row is not None and row[0] == 0:
                    self.read_sink()  # (marked only after the sink took them: all are in the file)
                    return []
                if self.give_up.is_set():
                    return ["a second Ctrl-C stopped the drain: what was not published yet counts as lost"]
                if time.monotonic() > deadline:
                    return [f"the drain did not finish in {DRAIN_TIMEOUT:g}s"]
                await asyncio.sleep(0.2)  # (a cadence, not a retry)

    def summary(self, notes: list[str]) -> DemoSummary:
        self.read_sink()
        return summarize(self.written, self.tally, time.monotonic() - self.started, notes)


async def _relay_and_check(demo: _Demo, rate: float, duration: float) -> list[str]:
    """Write and relay until asked to stop, then drain; notes for the summary."""
    relay, loop = demo.relay, asyncio.get_running_loop()
    relaying = asyncio.create_task(relay.run())
    await asyncio.sleep(0)  # relay.run has installed its signal handlers: the demo's replace them
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, demo.on_signal)
    if duration:
        loop.call_later(duration, demo.stop_writing.set)
    writer = asyncio.create_task(write_orders(demo.dsn, rate, demo.stop_writing, demo.written))
    follower = asyncio.create_task(demo.follow())
    stopped = asyncio.create_task(demo.stop_writing.wait())
    try:
        await asyncio.wait({stopped, relaying, writer}, return_when=asyncio.FIRST_COMPLETED)
        demo.stop_writing.set()
        await writer  # (raises if the writer failed: the demo cannot go on without it)
        if relaying.done():
            return [f"the relay stopped early (exit code {relaying.result()})"]
        return await demo.drain()
    finally:
        demo.stop_writing.set()
        relay.stop.set()
        follower.cancel()
        await asyncio.gather(relaying, follower, writer, stopped, return_exceptions=True)
        # (The relay took its signal handlers with it: a Ctrl-C now must not cost the summary.)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, demo.on_signal)


async def _demo(dsn: str, rate: float, duration: float, drop_every: int) -> int:
    with tempfile.TemporaryDirectory(prefix="outbox-relay-demo-") as directory:
        sink_path = os.path.join(directory, "events.jsonl")
        config = _config(dsn, sink_path)
        configure_logging(config.log.format, config.log.level)
        pipeline = _pipeline(config, drop_every)
        await set_up_database(config.outboxes[0], pipeline.source)  # (what init-db does)
        demo = _Demo(dsn, sink_path, Relay(config, [pipeline]))
        until = f"for {duration:g}s (or until Ctrl-C)" if duration else "until Ctrl-C"
        print(
            f"demo: writing {rate:g} order events/s into the outbox (orders placed, paid, shipped,"
            f" delivered; 20 at a time) {until}, relayed to a file sink; then it drains and checks"
            f" what the sink received. The events of {SAMPLE_ORDERS} orders:",
            file=sys.stderr,
            flush=True,
        )
        async with showing("demo", demo.measure, partial(demo.counts, "done")):
            notes = await _relay_and_check(demo, rate, duration)
        summary = demo.summary(notes)
    print(summary.as_text(), flush=True)
    return 0 if summary.passed else 1


def run_demo(dsn: str | None, rate: float, duration: float, drop_every: int = 0) -> int:
    server = None
    try:
        if dsn is None:
            dsn, server = _embedded_postgres()
        return asyncio.run(_demo(dsn, rate, duration, drop_every))
    except KeyboardInterrupt:  # (before the demo's own handlers were in place)
        print("demo: stopped before it started writing", file=sys.stderr)
        return 130
    except (psycopg.Error, ConfigError) as exc:
        print(f"demo: {scrubber.scrub(str(exc).strip().splitlines()[0])}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.cleanup()
