"""Polling -> Kafka benchmark. Prints figures and ratios; asserts nothing about timing.

In one run, against one private PostgreSQL and one Kafka-protocol broker (a private tansu, or the
cluster named by KAFKA_BOOTSTRAP_SERVERS):
  (a) a bare confluent-kafka producer sending the very messages the relay would send for a backlog
      of N events (same payload, headers and key), with the sink's producer settings: produce all,
      then flush. What the client and the broker can do without a database;
  (b) the relay draining the backlog of N events (1,000 aggregates) to the file sink;
  (c) the relay draining the same backlog to Kafka, and the ratios c/b and c/a.
      b and c alternate for --rounds rounds, each drain in a new Python process; the figures are
      the medians. Each drain gives two rates: the whole drain from the relay's start (its
      start-up included: the Kafka sink waits for metadata twice, see KafkaSink._probe), and
      the steady rate while the middle 80% of the backlog was published;
  (d) end-to-end latency p50/p99 (the created_at header -> the consumer receiving the message) at a
      steady 2,000 events/s, each event its own transaction, NOTIFY wake-ups on; the consumer reads
      by partition assignment in a thread;
  (e) the same latency with the bare producer of (a) at the same rate and the same consumer: the
      part of (d) that is the client, the broker and the consumer rather than the relay.

    python -m tests.bench.bench_polling_kafka [--events 200000] [--rounds 3] [--rate 2000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import psycopg
import yaml

from outbox_relay.connectors.sinks.kafka import KafkaSinkConfig
from tests.bench.bench_polling_file import AGGREGATES, Drain, _epoch, _pct, _reset, drain_in_child
from tests.harness.kafka import create_topic, start_kafka
from tests.harness.postgres import start_postgres
from tests.support import create_outbox_database, outbox_events, relay_config

Message = tuple[bytes, bytes, list[tuple[str, str | bytes | None]]]  # value, key, headers


def _kafka_sink(bootstrap_servers: str, topic: str) -> dict[str, Any]:
    return {"type": "kafka", "bootstrap_servers": bootstrap_servers, "topic": topic}


def outbox_messages(dsn: str) -> list[Message]:
    """The messages the relay produces for the rows now in the outbox: payload as the polling source
    reads it, the sink's standard headers, the aggregate id as key."""
    messages: list[Message] = []
    for event in outbox_events(dsn):
        standard: list[tuple[str, str | bytes | None]] = [
            (name, value.encode()) for name, value in event.standard_headers().items()
        ]
        messages.append((event.payload, (event.aggregate_id or "").encode(), standard))
    return messages


def bare_producer(bootstrap_servers: str, topic: str, messages: list[Message]) -> tuple[int, float]:
    from confluent_kafka import Producer

    settings = KafkaSinkConfig(type="kafka", bootstrap_servers=bootstrap_servers).producer_settings()
    producer = Producer(settings)
    failed: list[str] = []

    def report(err: Any, _message: Any) -> None:
        if err is not None:
            failed.append(err.name())

    started = time.perf_counter()
    for value, key, headers in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
                break
            except BufferError:  # the local queue is full: serve delivery reports, then go on
                producer.poll(0.01)
    left = producer.flush(120)
    elapsed = time.perf_counter() - started
    assert left == 0, f"bare producer: {left} not flushed, failures {failed[:3]}"
    assert not failed, f"bare producer: {left} not flushed, failures {failed[:3]}"
    return len(messages), elapsed


class LatencyReader:
    """Reads a topic by partition assignment in a thread and records, per message, the receive
    time minus its `created_at` header."""

    def __init__(self, bootstrap_servers: str, topic: str, partitions: int) -> None:
        self.latencies: list[float] = []
        self.received = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(bootstrap_servers, topic, partitions))
        self._thread.start()

    def wait_for(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.latencies) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self, bootstrap_servers: str, topic: str, partitions: int) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": f"bench-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 10,
                "log_level": 0,
            }
        )
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        try:
            while not self._stop.is_set():
                for message in consumer.consume(num_messages=1000, timeout=0.05):
                    now = time.time()
                    if message.error() is not None:
                        continue
                    created = dict(message.headers() or [])["created_at"]
                    assert isinstance(created, bytes)
                    self.latencies.append(now - _epoch(created.decode()))
                    self.received.set()
        finally:
            consumer.close()


def paced(rate: int, total: int, send: Callable[[int], object]) -> float:
    """Call send(0), send(1), ... `total` times at `rate` per second; return the achieved rate."""
    started = next_at = time.perf_counter()
    for i in range(total):
        send(i)
        next_at += 1.0 / rate
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    return total / (time.perf_counter() - started)


def relay_latency(
    dsn: str, directory: Path, bootstrap_servers: str, topic: str, partitions: int, rate: int, seconds: float
) -> tuple[list[float], float]:
    """(latencies in s, achieved write rate) of a relay process relaying inserts to `topic`."""
    config = relay_config(dsn, _kafka_sink(bootstrap_servers, topic))
    config["log"] = {"format": "json", "level": "warning"}
    config_path = directory / "latency.yaml"
    config_path.write_text(yaml.safe_dump(config))
    relay = subprocess.Popen([sys.executable, "-m", "outbox_relay", "run", "-c", str(config_path)])
    reader = LatencyReader(bootstrap_servers, topic, partitions)
    total = int(rate * seconds)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            insert = (
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                " VALUES ('order', %s, 'OrderUpdated', %s)"
            )
            # One event through relay, broker and consumer before measuring: all connected.
            conn.execute(insert, ("warm-up", json.dumps({"seq": -1})))
            if not reader.received.wait(30):
                raise RuntimeError("the warm-up event did not arrive within 30 s")
            reader.latencies.clear()
            achieved = paced(
                rate,
                total,
                lambda i: conn.execute(insert, (f"order-{i % AGGREGATES}", json.dumps({"seq": i}))),
            )
        reader.wait_for(total, 30)
    finally:
        reader.close()
        relay.terminate()
        relay.wait(timeout=30)
    return reader.latencies, achieved


def bare_latency(
    bootstrap_servers: str, topic: str, partitions: int, rate: int, seconds: float
) -> tuple[list[float], float]:
    """The same measurement with a bare producer (the sink's settings) instead of database + relay:
    what the client, the broker and the consumer add on their own."""
    from confluent_kafka import Producer

    producer = Producer(
        KafkaSinkConfig(type="kafka", bootstrap_servers=bootstrap_servers).producer_settings()
    )
    reader = LatencyReader(bootstrap_servers, topic, partitions)
    total = int(rate * seconds)

    def send(i: int) -> None:
        created = datetime.now(UTC).isoformat().encode()
        key = b"order-%d" % (i % AGGREGATES)
        producer.produce(topic, value=b'{"seq": %d}' % i, key=key, headers=[("created_at", created)])
        producer.poll(0)

    try:
        send(-1)
        producer.flush(30)
        if not reader.received.wait(30):
            raise RuntimeError("the warm-up message did not arrive within 30 s")
        reader.latencies.clear()
        achieved = paced(rate, total, send)
        producer.flush(30)
        reader.wait_for(total, 30)
    finally:
        reader.close()
    return reader.latencies, achieved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3, help="of the file and Kafka drains, alternating")
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--partitions", type=int, default=4, help="of every topic the benchmark creates")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {}
    run = uuid.uuid4().hex[:8]
    with (
        start_postgres() as pg,
        start_kafka() as kafka,
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
    ):
        directory = Path(tmp)
        servers = kafka.bootstrap_servers
        report["broker"] = f"tansu (private, {servers})" if kafka.owned else f"external ({servers})"
        dsn = create_outbox_database(pg)
        topics = {name: f"bench-{run}-{name}" for name in ("bare", "drain", "e2e-relay", "e2e-bare")}
        for topic in topics.values():
            create_topic(servers, topic, args.partitions)

        _reset(dsn, args.events)
        sent, seconds = bare_producer(servers, topics["bare"], outbox_messages(dsn))
        report["a_bare_producer_msgs_per_s"] = round(sent / seconds)

        sinks = {"file": {"type": "file", "path": str(directory / "drain.jsonl")}}
        sinks["kafka"] = _kafka_sink(servers, topics["drain"])
        drains: dict[str, list[Drain]] = {"file": [], "kafka": []}
        for round_ in range(1, args.rounds + 1):
            for name, sink in sinks.items():
                _reset(dsn, args.events)
                drain = drain_in_child(dsn, sink, args.events)
                drains[name].append(drain)
                print(
                    f"round {round_} {name:5}  {drain.per_s:8,.0f} events/s whole drain,"
                    f" {drain.steady_per_s:8,.0f} steady, first ack after {drain.first_ack_s * 1000:.0f} ms",
                    flush=True,
                )
        for letter, name in (("b", "file"), ("c", "kafka")):
            runs = drains[name]
            report[f"{letter}_relay_{name}_events_per_s"] = round(median(d.per_s for d in runs))
            report[f"{letter}_relay_{name}_steady_per_s"] = round(median(d.steady_per_s for d in runs))
            report[f"{letter}_first_ack_ms"] = round(median(d.first_ack_s for d in runs) * 1000)
        pairs = list(zip(drains["file"], drains["kafka"], strict=True))
        report["ratio_c_over_b"] = round(median(c.per_s / b.per_s for b, c in pairs), 3)
        report["ratio_c_over_b_steady"] = round(median(c.steady_per_s / b.steady_per_s for b, c in pairs), 3)
        report["ratio_c_over_a"] = round(
            report["c_relay_kafka_events_per_s"] / report["a_bare_producer_msgs_per_s"], 3
        )

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox")
        total = int(args.rate * args.seconds)
        relay = relay_latency(
            dsn, directory, servers, topics["e2e-relay"], args.partitions, args.rate, args.seconds
        )
        bare = bare_latency(servers, topics["e2e-bare"], args.partitions, args.rate, args.seconds)
        for name, (latencies, achieved) in (("d_relay", relay), ("e_bare", bare)):
            report[f"{name}_latency_events"] = f"{len(latencies)} of {total} at {achieved:.0f}/s"
            if latencies:
                report[f"{name}_latency_p50_ms"] = round(_pct(latencies, 0.50) * 1000, 2)
                report[f"{name}_latency_p99_ms"] = round(_pct(latencies, 0.99) * 1000, 2)
                report[f"{name}_latency_max_ms"] = round(max(latencies) * 1000, 2)
    for key, value in report.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
