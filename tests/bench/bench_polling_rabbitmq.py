"""Polling -> RabbitMQ benchmark. Prints figures and ratios; asserts nothing about timing.

In one run, against one private PostgreSQL and one RabbitMQ broker (RELAY_TEST_AMQP_URL, else a
private node, or with --system-node the system node on 127.0.0.1:5672), with a backlog of N events
over 1,000 aggregates:
  (a) raw pika publishing the very messages the relay would send for that backlog (same body,
      properties, headers, routing key, persistent, mandatory) to a topic exchange bound to one
      durable queue, with publisher confirms pipelined: up to --window messages outstanding, on
      pika's asyncio adapter (as the sink uses it). What the client and the broker can do without
      a database and without per-aggregate ordering;
  (b) the relay draining the same backlog to the same exchange and queue (`run --drain`, its own
      process, timed from its "outbox started" to its "drained" log line), and the ratio b/a;
  (c) for context, the relay draining the same backlog to the file sink (a file in the temporary
      directory, deleted afterwards): the relay's ceiling with a sink that costs next to nothing.
The queue is deleted and declared again between runs. With --rounds N, (a) and (b) alternate N
times; the medians are reported, and b/a is the median of the rounds' own ratios (broker
throughput varies from run to run). A private node is the default because integration tests
restart the shared system node, which would spoil the figures. With --profile FILE, one more
in-process drain to RabbitMQ runs under cProfile; the stats go to FILE and the top entries are
printed.

    python -m tests.bench.bench_polling_rabbitmq [--events 100000] [--window 2000] [--rounds 1]
                                                 [--profile FILE] [--system-node]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outbox_relay.connectors.sinks.rabbitmq import message_properties
from tests.bench.bench_logical import drain
from tests.bench.bench_polling_file import AGGREGATES, _reset
from tests.harness.postgres import start_postgres
from tests.harness.rabbitmq import declare_queue, delete, queue_depth, start_rabbitmq
from tests.support import create_outbox_database, outbox_events

ROUTING_KEY = "{aggregate_type}.{event_type}"  # the sink's default
YIELD_EVERY = 128  # as the sink: let the loop write frames and read confirms while publishing
FILE_SINK_NAME = "file-sink.jsonl"  # (c) writes here, in the temporary directory

Message = tuple[str, bytes, Any]  # routing key, body, pika.BasicProperties


def outbox_messages(dsn: str) -> list[Message]:
    """The messages the relay publishes for the rows now in the outbox: the payload as the polling
    source reads it, the sink's properties and standard headers, the default routing key."""
    import pika

    messages: list[Message] = []
    for event in outbox_events(dsn):
        properties = message_properties(pika.BasicProperties, event)
        messages.append((ROUTING_KEY.format_map(event.template_fields()), event.payload, properties))
    return messages


class _Confirms:
    """The publisher-confirm bookkeeping of one raw publishing run: which delivery tags are still
    unconfirmed (at most `window` of them once the publisher waits for room), how many ended acked,
    nacked or returned, and whether the connection was lost. The pika callbacks (`on_confirm`,
    `on_return`, `on_closed`) update it; the publisher waits on it (`wait_for_room`,
    `wait_all_confirmed`)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.unconfirmed: dict[int, None] = {}  # insertion order is delivery-tag order
        self.counts = {"acked": 0, "nacked": 0, "returned": 0}
        self.lost: list[str] = []
        self.room = asyncio.Event()
        self.all_confirmed = asyncio.Event()

    def published(self, tag: int) -> None:
        """Records that the message with delivery tag `tag` was just published."""
        self.unconfirmed[tag] = None
        self.all_confirmed.clear()

    def full(self) -> bool:
        return len(self.unconfirmed) >= self.window

    async def wait_for_room(self) -> None:
        """Returns once fewer than `window` are unconfirmed; raises SystemExit if the connection
        was lost meanwhile."""
        self.room.clear()
        await self.room.wait()
        self.raise_if_lost()

    async def wait_all_confirmed(self, timeout: float) -> None:
        """Returns once nothing is unconfirmed (or the connection was lost: see `raise_if_lost`)."""
        await asyncio.wait_for(self.all_confirmed.wait(), timeout)

    def raise_if_lost(self) -> None:
        if self.lost:
            raise SystemExit(f"raw publishing: connection lost: {self.lost[0]}")

    def acked(self) -> int:
        """The messages confirmed with basic.ack; raises SystemExit if any was nacked or returned."""
        if self.counts["nacked"] or self.counts["returned"]:
            raise SystemExit(
                f"raw publishing: {self.counts['nacked']} nacked, {self.counts['returned']} returned"
            )
        return self.counts["acked"]

    def on_confirm(self, frame: Any) -> None:
        """pika's callback for basic.ack and basic.nack, single or `multiple` (every tag up to)."""
        method = frame.method
        outcome = "nacked" if method.NAME == "Basic.Nack" else "acked"
        if method.multiple:
            self._settle_up_to(method.delivery_tag, outcome)
        elif method.delivery_tag in self.unconfirmed:
            self._settle(method.delivery_tag, outcome)
        if len(self.unconfirmed) < self.window:
            self.room.set()
        if not self.unconfirmed:
            self.all_confirmed.set()

    def _settle_up_to(self, last_tag: int, outcome: str) -> None:
        while self.unconfirmed:
            first = next(iter(self.unconfirmed))
            if first > last_tag:
                break
            self._settle(first, outcome)

    def _settle(self, tag: int, outcome: str) -> None:
        del self.unconfirmed[tag]
        self.counts[outcome] += 1

    def on_return(self, *_: Any) -> None:
        """pika's callback for basic.return (a mandatory message no queue took)."""
        self.counts["returned"] += 1

    def on_closed(self, exc: BaseException) -> None:
        """Called when the connection closes: records why and wakes the publisher, which then
        sees `lost`."""
        self.lost.append(repr(exc))
        self.room.set()
        self.all_confirmed.set()


async def _open_connection(
    url: str, on_closed: Callable[[BaseException], None]
) -> tuple[Any, asyncio.Future[None]]:
    """Opens a pika AsyncioConnection on the running loop (15 s at most, else raises); returns it
    with a future done once it has closed. `on_closed` is called with the reason when it closes."""
    import pika
    from pika.adapters.asyncio_connection import AsyncioConnection

    loop = asyncio.get_running_loop()
    opened: asyncio.Future[Any] = loop.create_future()
    closed: asyncio.Future[None] = loop.create_future()

    def on_open_error(_connection: Any, exc: BaseException) -> None:
        if not opened.done():
            opened.set_exception(RuntimeError(f"cannot connect: {exc!r}"))

    def on_close(_connection: Any, exc: BaseException) -> None:
        on_closed(exc)
        if not closed.done():
            closed.set_result(None)
        if not opened.done():
            opened.set_exception(RuntimeError(f"connection closed: {exc!r}"))

    connection = AsyncioConnection(
        pika.URLParameters(url),
        on_open_callback=opened.set_result,
        on_open_error_callback=on_open_error,
        on_close_callback=on_close,
        custom_ioloop=loop,
    )
    await asyncio.wait_for(opened, 15)
    return connection, closed


async def _rpc(start: Callable[[Callable[[Any], None]], Any]) -> Any:
    """Calls `start` with a completion callback and returns what that callback receives (15 s at
    most): pika's callback style of channel.open, confirm.select and the like, awaited."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(result: Any) -> None:
        if not future.done():
            future.set_result(result)

    start(done)
    return await asyncio.wait_for(future, 15)


async def _confirming_channel(connection: Any, confirms: _Confirms) -> Any:
    """A channel of `connection` in confirm mode, its confirms and returns reported to `confirms`."""
    channel = await _rpc(lambda done: connection.channel(on_open_callback=done))
    channel.add_on_return_callback(confirms.on_return)
    await _rpc(lambda done: channel.confirm_delivery(confirms.on_confirm, callback=done))
    return channel


async def _publish_confirmed(
    channel: Any, exchange: str, messages: list[Message], confirms: _Confirms
) -> float:
    """Publishes every message (mandatory), waiting for room whenever `window` are unconfirmed,
    then for the last confirm; returns the seconds from the first publish to the last confirm."""
    publish = channel.basic_publish
    started = time.perf_counter()
    for tag, (routing_key, body, properties) in enumerate(messages, start=1):
        if confirms.full():
            await confirms.wait_for_room()
        elif tag % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        publish(exchange, routing_key, body, properties, mandatory=True)
        confirms.published(tag)
    await confirms.wait_all_confirmed(120)
    seconds = time.perf_counter() - started
    confirms.raise_if_lost()
    return seconds


async def _close(connection: Any, closed: asyncio.Future[None]) -> None:
    if connection.is_open:
        connection.close()
    await asyncio.wait_for(closed, 10)


async def raw_publish(url: str, exchange: str, messages: list[Message], window: int) -> tuple[int, float]:
    """Publish every message with confirms, at most `window` unconfirmed at a time; returns
    (confirmed with basic.ack and not returned, seconds from the first publish to the last confirm)."""
    confirms = _Confirms(window)
    connection, closed = await _open_connection(url, confirms.on_closed)
    try:
        channel = await _confirming_channel(connection, confirms)
        seconds = await _publish_confirmed(channel, exchange, messages, confirms)
    finally:
        await _close(connection, closed)
    return confirms.acked(), seconds


def _fresh_queue(url: str, queue: str, exchange: str) -> None:
    delete(url, queues=[queue])
    declare_queue(url, queue, exchange, "order.*", exchange_type="topic")


def _expect_depth(url: str, queue: str, count: int) -> None:
    depth = queue_depth(url, queue)
    if depth != count:
        raise SystemExit(f"queue {queue} holds {depth} messages, expected {count}")


def profile_drain(dsn: str, sink: dict[str, Any], out: Path, top: int = 30) -> float:
    """An in-process `run --drain` under cProfile; returns events/s (slower than unprofiled)."""
    import cProfile
    import pstats

    from outbox_relay.config import parse_config
    from outbox_relay.runner import Relay, tune_garbage_collector

    config = {
        "outboxes": [{"name": "bench", "source": {"type": "postgres-polling", "dsn": dsn}, "sink": sink}],
        "http": {"port": 0},
        "log": {"format": "json", "level": "warning"},
    }

    async def main() -> tuple[int, float]:
        relay = Relay(parse_config(config, "bench.yaml", {}))
        started = time.perf_counter()
        assert await relay.run(drain=True) == 0
        return relay.pipelines[0].published, time.perf_counter() - started

    tune_garbage_collector()  # as `outbox-relay run` does
    profiler = cProfile.Profile()
    published, seconds = profiler.runcall(asyncio.run, main())
    profiler.dump_stats(out)
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return published / seconds


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=2_000, help="unconfirmed messages at most in (a)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate (a) and (b) this often; medians are reported"
    )
    parser.add_argument("--profile", type=Path, help="also profile an in-process drain; stats to this file")
    parser.add_argument(
        "--system-node",
        action="store_true",
        help="use the system node on 127.0.0.1:5672 when it answers (shared: tests that restart it "
        "disturb the figures); by default a private node is booted",
    )
    return parser.parse_args(argv)


@dataclass(frozen=True)
class _Bench:
    """What every step of one benchmark run shares: the outbox database, the broker with the
    run's exchange and queue, the temporary directory and the backlog's size."""

    dsn: str
    url: str
    exchange: str
    queue: str
    directory: Path
    events: int

    @property
    def source(self) -> dict[str, Any]:
        return {"type": "postgres-polling", "dsn": self.dsn}

    @property
    def sink(self) -> dict[str, Any]:
        return {"type": "rabbitmq", "url": self.url, "exchange": self.exchange}

    def fresh_queue(self) -> None:
        _fresh_queue(self.url, self.queue, self.exchange)

    def expect_depth(self) -> None:
        _expect_depth(self.url, self.queue, self.events)


def _raw_round(bench: _Bench, window: int) -> float:
    """(a) once: raw pika publishes the relay's messages for a fresh backlog; returns messages/s."""
    _reset(bench.dsn, bench.events)  # the backlog; (a) only reads it, so (b) drains the very same rows
    messages = outbox_messages(bench.dsn)
    bench.fresh_queue()
    confirmed, seconds = asyncio.run(raw_publish(bench.url, bench.exchange, messages, window))
    bench.expect_depth()
    return confirmed / seconds


def _relay_round(bench: _Bench) -> dict[str, float]:
    """(b) once: the relay drains the backlog (a) left in the outbox to the broker; its figures."""
    bench.fresh_queue()
    figures = drain(bench.directory, bench.source, bench.sink, bench.events)
    bench.expect_depth()
    return figures


def _raw_and_relay(bench: _Bench, window: int, rounds: int, report: dict[str, Any]) -> None:
    """(a) and (b) alternating `rounds` times; their medians and the median of the rounds' b/a."""
    raw_rates: list[float] = []
    relay_rates: list[float] = []
    for round_ in range(1, rounds + 1):
        raw_rates.append(_raw_round(bench, window))
        figures = _relay_round(bench)
        relay_rates.append(figures["events_per_s"])
        report["b_relay_rabbitmq_rss_mb"] = round(figures["rss_mb"], 1)
        if rounds > 1:
            report[f"round_{round_}_a_b_ratio"] = (
                f"{raw_rates[-1]:.0f} {relay_rates[-1]:.0f} {relay_rates[-1] / raw_rates[-1]:.3f}"
            )
    report["a_raw_pika_msgs_per_s"] = round(statistics.median(raw_rates))
    report["b_relay_rabbitmq_events_per_s"] = round(statistics.median(relay_rates))
    # Each round's b/a compares runs made moments apart; their median resists a busy machine.
    report["ratio_b_over_a"] = round(
        statistics.median(b / a for a, b in zip(raw_rates, relay_rates, strict=True)), 3
    )


def _relay_to_file(bench: _Bench, report: dict[str, Any]) -> None:
    """(c): the relay drains a fresh backlog to the file sink; its figures and b/c."""
    _reset(bench.dsn, bench.events)
    figures = drain(bench.directory, bench.source, _file_sink(bench.directory), bench.events)
    (bench.directory / FILE_SINK_NAME).unlink(missing_ok=True)
    report["c_relay_file_events_per_s"] = round(figures["events_per_s"])
    report["c_relay_file_rss_mb"] = round(figures["rss_mb"], 1)
    report["ratio_b_over_c"] = round(
        report["b_relay_rabbitmq_events_per_s"] / report["c_relay_file_events_per_s"], 3
    )


def _profiled(bench: _Bench, out: Path, report: dict[str, Any]) -> None:
    _reset(bench.dsn, bench.events)
    bench.fresh_queue()
    report["profiled_relay_rabbitmq_events_per_s"] = round(profile_drain(bench.dsn, bench.sink, out))


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    report: dict[str, Any] = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    exchange, queue = f"{prefix}.x", f"{prefix}.q"
    with (
        start_postgres() as pg,
        start_rabbitmq(private=not args.system_node) as rabbit,
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
    ):
        report["broker"] = repr(rabbit)
        report["events"] = f"{args.events} over {AGGREGATES} aggregates"
        report["a_raw_pika_window"] = args.window
        dsn = create_outbox_database(pg)
        bench = _Bench(dsn, rabbit.url, exchange, queue, Path(tmp), args.events)
        try:
            _raw_and_relay(bench, args.window, args.rounds, report)
            _relay_to_file(bench, report)
            if args.profile:
                _profiled(bench, args.profile, report)
        finally:
            delete(rabbit.url, queues=[queue], exchanges=[exchange])
    report["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    for key, value in report.items():
        print(f"{key:38} {value}")


def _file_sink(directory: Path) -> dict[str, Any]:
    # A regular file: the file sink refuses /dev/null (a character device), and the relay exits 2.
    return {"type": "file", "path": str(directory / FILE_SINK_NAME)}


if __name__ == "__main__":
    main()
