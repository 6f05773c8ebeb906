"""NATS JetStream, Redis Streams and webhook sinks: the relay against the raw client, in one run.
Prints figures and ratios; asserts nothing about timing (only that every event arrived).

Against one private PostgreSQL, a private nats-server (-js, file storage), a private redis-server
(no persistence) and a webhook receiver in a process of its own (tests/harness/webhook.py), for a
backlog of N events (1,000 aggregates, the rows of tests.support.insert_events):

  relay    `python -m relay run --drain` as its own process (tests.bench.bench_logical.drain):
           events/s between "outbox started" and "drained" in its log;
  raw      the client library alone sending the very same messages (payload and headers as the
           sink builds them) in chunks of 1,000 (the relay's publish_batch_size):
             nats     nats-py js.publish_async for a chunk, then all its PubAcks;
             redis    one redis-py pipeline of XADDs per chunk;
             webhook  httpx POSTs to the same receiver: batch mode one JSON array per chunk,
                      event mode one POST per event, 16 at a time (the sink's max_concurrency);
  ratio    relay / raw: what the database, the pipeline and the sink cost on top of the client.

The polling -> file drain of the same backlog is printed as the baseline of the relay itself.

    python -m tests.bench.bench_more_sinks [--events 200000] [--webhook-event-events 20000]
        [--only nats,redis,webhook-batch,webhook-event]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from outbox_relay.connectors.sinks.redis_streams import entry_fields
from outbox_relay.connectors.sinks.webhook import batch_body, batch_key, event_headers
from outbox_relay.events import OutboxEvent
from tests.bench.bench_logical import drain
from tests.bench.bench_polling_file import _reset
from tests.harness.nats import run_async, start_nats
from tests.harness.postgres import start_postgres
from tests.harness.redis import start_redis
from tests.support import create_outbox_database, outbox_events

CHUNK = 1000
CONCURRENCY = 16
RUNS = ("nats", "redis", "webhook-batch", "webhook-event")


def _chunks(events: list[OutboxEvent]) -> list[list[OutboxEvent]]:
    return [events[i : i + CHUNK] for i in range(0, len(events), CHUNK)]


def _timed(make: Callable[[], Coroutine[Any, Any, int]]) -> tuple[int, float]:
    async def main() -> tuple[int, float]:
        started = time.perf_counter()
        sent = await make()
        return sent, time.perf_counter() - started

    return asyncio.run(main())


def stream_messages(url: str, stream: str) -> int:
    async def count() -> int:
        import nats

        client = await nats.connect(url)
        try:
            info = await client.jetstream().stream_info(stream)
            return int(info.state.messages)
        finally:
            await client.close()

    return run_async(count)


# --- raw clients ---------------------------------------------------------------------------------


def raw_nats(url: str, stream: str, events: list[OutboxEvent]) -> tuple[int, float]:
    import nats
    from nats.js.api import StreamConfig

    async def prepare() -> None:
        client = await nats.connect(url)
        await client.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        await client.close()

    asyncio.run(prepare())
    messages = [
        (
            f"{stream}.{e.aggregate_type}.{e.event_type}",
            e.payload,
            {**e.standard_headers(), "Nats-Msg-Id": e.event_id, "Content-Type": e.content_type},
        )
        for e in events
    ]

    async def send() -> int:
        client = await nats.connect(url)
        js = client.jetstream(publish_async_max_pending=CHUNK)
        acked = 0
        for start in range(0, len(messages), CHUNK):
            futures = [
                await js.publish_async(subject, payload, headers=headers)
                for subject, payload, headers in messages[start : start + CHUNK]
            ]
            acked += len(await asyncio.gather(*futures))
        await client.close()
        return acked

    return _timed(send)


def raw_redis(url: str, key: str, events: list[OutboxEvent]) -> tuple[int, float]:
    from redis.asyncio import Redis

    entries = [entry_fields(e) for e in events]

    async def send() -> int:
        client = Redis.from_url(url)
        added = 0
        for start in range(0, len(entries), CHUNK):
            pipe = client.pipeline(transaction=False)
            for fields in entries[start : start + CHUNK]:
                # redis-py types the fields as a dict of its own key and value unions, and a dict
                # is invariant: a dict[str, str | bytes] is refused although xadd takes it.
                pipe.xadd(key, fields)  # type: ignore[arg-type]
            added += sum(1 for reply in await pipe.execute() if reply)
        await client.aclose()
        return added

    return _timed(send)


async def _post_all(client: Any, url: str, pending: Iterator[tuple[bytes, dict[str, bytes]]]) -> int:
    """POST requests taken from a shared iterator until it is empty (one of N concurrent workers)."""
    done = 0
    for body, headers in pending:
        response = await client.post(url, content=body, headers=headers)
        response.raise_for_status()
        done += 1
    return done


def raw_webhook(url: str, events: list[OutboxEvent], mode: str) -> tuple[int, float]:
    import httpx

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    if mode == "batch":
        bodies = [(batch_body(c), batch_key(c), len(c)) for c in _chunks(events)]

        async def send_batches() -> int:
            sent = 0
            async with httpx.AsyncClient(limits=limits) as client:
                for body, key, count in bodies:
                    headers = {"Content-Type": "application/json", "Idempotency-Key": key}
                    response = await client.post(url, content=body, headers=headers)
                    response.raise_for_status()
                    sent += count
            return sent

        return _timed(send_batches)

    requests: list[tuple[bytes, dict[str, bytes]]] = []
    for event in events:
        headers = event_headers(event)
        assert isinstance(headers, dict)
        requests.append((event.payload, headers))

    async def send_each() -> int:
        sent = 0
        async with httpx.AsyncClient(limits=limits) as client:
            for start in range(0, len(requests), CHUNK):
                pending = iter(requests[start : start + CHUNK])
                sent += sum(
                    await asyncio.gather(*(_post_all(client, url, pending) for _ in range(CONCURRENCY)))
                )
        return sent

    return _timed(send_each)


# --- the webhook receiver process ---------------------------------------------------------------


class ReceiverProcess:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.webhook"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening "):
            self.process.kill()
            raise SystemExit(f"the webhook receiver did not start: {line!r}")
        self.url = line.removeprefix("listening ")

    def events(self) -> int:
        stats_url = self.url.rsplit("/", 1)[0] + "/_stats"
        with urllib.request.urlopen(stats_url, timeout=10) as response:
            return int(json.loads(response.read())["events"])

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--webhook-event-events",
        type=int,
        default=20_000,
        help="backlog for webhook event mode (one POST per event is far slower than the others)",
    )
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    args = parser.parse_args(argv)
    selected = [run for run in args.only.split(",") if run]
    unknown = set(selected) - set(RUNS)
    if unknown:
        parser.error(f"unknown runs: {', '.join(sorted(unknown))}")

    rows: list[tuple[str, int, float, float | None]] = []  # label, events, relay/s, raw/s
    with start_postgres() as pg, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        directory = Path(tmp)
        dsn = create_outbox_database(pg)
        source = {"type": "postgres-polling", "dsn": dsn}

        def relay_run(sink: dict[str, Any], events: int) -> float:
            _reset(dsn, events)
            return drain(directory, source, sink, events)["events_per_s"]

        n = args.events
        rows.append(
            (
                "polling -> file (baseline)",
                n,
                relay_run({"type": "file", "path": str(directory / "o")}, n),
                None,
            )
        )

        if "nats" in selected:
            with start_nats(private=True) as server:
                _reset(dsn, n)
                sent, seconds = raw_nats(server.url, "BENCH_RAW", outbox_events(dsn))
                assert sent == n
                sink = {
                    "type": "nats",
                    "servers": server.url,
                    "stream": "BENCH_RELAY",
                    "subject": "bench.{aggregate_type}.{event_type}",
                }
                relay = relay_run(sink, n)
                stored = stream_messages(server.url, "BENCH_RELAY")
                assert stored == n, f"the stream holds {stored} of {n}"
                rows.append(("nats (JetStream, file storage)", n, relay, sent / seconds))

        if "redis" in selected:
            with start_redis(private=True) as redis_server:
                _reset(dsn, n)
                sent, seconds = raw_redis(redis_server.url, "bench-raw", outbox_events(dsn))
                assert sent == n
                relay = relay_run({"type": "redis", "url": redis_server.url, "stream": "bench-relay"}, n)
                client = redis_server.client()
                length = client.xlen("bench-relay")
                assert length == n, f"the stream holds {length} of {n}"
                rows.append(("redis (streams, no persistence)", n, relay, sent / seconds))

        for mode in ("batch", "event"):
            if f"webhook-{mode}" not in selected:
                continue
            count = n if mode == "batch" else min(n, args.webhook_event_events)
            receiver = ReceiverProcess()
            try:
                _reset(dsn, count)
                sent, seconds = raw_webhook(receiver.url, outbox_events(dsn), mode)
                assert sent == count
                assert receiver.events() == count
                relay = relay_run({"type": "webhook", "url": receiver.url, "mode": mode}, count)
                assert receiver.events() == 2 * count, (
                    f"the receiver got {receiver.events() - count} of {count}"
                )
            finally:
                receiver.close()
            label = (
                "webhook batch (1 POST per 1000)"
                if mode == "batch"
                else "webhook event (1 POST each, 16 at once)"
            )
            rows.append((label, count, relay, sent / seconds))

    print(f"{'run':42} {'events':>8} {'relay ev/s':>11} {'raw msg/s':>10} {'relay/raw':>10}")
    for label, events, relay, raw in rows:
        raw_text = f"{raw:10.0f}" if raw is not None else f"{'-':>10}"
        ratio = f"{relay / raw:10.2f}" if raw is not None else f"{'-':>10}"
        print(f"{label:42} {events:8d} {relay:11.0f} {raw_text} {ratio}")


if __name__ == "__main__":
    main()
