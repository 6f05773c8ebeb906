"""Polling -> file benchmark. Prints figures and ratios; asserts nothing about timing.

In one run, against one private PostgreSQL:
  (a) a bare loop: SELECT ... ORDER BY position LIMIT 1000, then UPDATE ... SET published_at = now()
      WHERE position = ANY(...), over a backlog of N events: the cost of the database work alone;
  (b) the relay draining the same backlog to the file sink, and the ratio b/a;
  (c) peak RSS of the relay process draining a 1,000,000-event backlog;
  (d) end-to-end latency p50/p99 (created_at -> line in the file) at a steady 1,000 events/s,
      each event its own transaction, NOTIFY wake-ups on;
  (e) what reading the gaps costs (the rule that keeps per-aggregate order with late commits):
      drains of the same backlog by the relay as shipped and by a source that reads ahead from
      the highest position read, never reads a gap again and lists no writers (the rule before,
      unsafe with concurrent writers), alternating over `--rounds`, each in a new process;
      medians and their ratio.

    python -m tests.bench.bench_polling_file [--events 200000] [--rss-events 1000000] [--rate 1000]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import yaml

from outbox_relay.config import parse_config
from outbox_relay.connectors.sources.postgres_polling import PostgresPollingSource
from outbox_relay.connectors.sources.read_cursor import ReadCursor
from outbox_relay.runner import Relay, tune_garbage_collector
from tests.bench.child_process import run_relay_watching_memory
from tests.harness.postgres import start_postgres
from tests.support import create_outbox_database, insert_events, relay_config

AGGREGATES = 1000


def _reset(dsn: str, events: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox")
    insert_events(dsn, events, AGGREGATES)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE outbox")


def bare_loop(dsn: str) -> tuple[int, float]:
    moved = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        started = time.perf_counter()
        while True:
            rows = conn.execute(
                "SELECT position, event_id, aggregate_type, aggregate_id, event_type, payload, headers,"
                " created_at FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT 1000"
            ).fetchall()
            if not rows:
                break
            conn.execute(
                "UPDATE outbox SET published_at = now() WHERE position = ANY(%s)", ([r[0] for r in rows],)
            )
            moved += len(rows)
        return moved, time.perf_counter() - started


@dataclass(frozen=True)
class Drain:
    """One drain of a backlog by the relay, timed from the start of `Relay.run`."""

    published: int
    seconds: float
    #: Until the first event was acknowledged: connecting, the sink's start-up, the first fetch.
    first_ack_s: float
    #: Events/s while the middle 80% of the backlog was published: the steady rate, without
    #: start-up and the last, partly filled batches.
    steady_per_s: float

    @property
    def per_s(self) -> float:
        return self.published / self.seconds


class _NoGaps(ReadCursor):
    """Reads ahead from the highest position read, as the polling source did before: no gap is
    read again, no writer listed."""

    def begin_read(self) -> tuple[int, list[tuple[int, int]]]:
        return super().begin_read()[0], []

    @property
    def wants_writers(self) -> bool:
        return False


class _CursorOnlySource(PostgresPollingSource):
    """The polling source without the cost of the gaps. Unsafe with concurrent writers: only
    here to price the gaps."""

    async def start(self) -> None:
        self._cursor = _NoGaps()
        await super().start()


def drain_in_process(dsn: str, sink: dict[str, Any], events: int, reading: str = "floor") -> Drain:
    """The relay draining the outbox (`events` rows) to `sink` in this process, set up as
    `outbox-relay run --drain` sets itself up; with `reading="cursor"`, through `_CursorOnlySource`."""
    config = relay_config(dsn, sink)
    config["log"] = {"format": "json", "level": "warning"}

    async def main() -> Drain:
        relay = Relay(parse_config(config, "bench.yaml", {}))
        if reading == "cursor":
            pipeline = relay.pipelines[0]
            assert isinstance(pipeline.source, PostgresPollingSource)
            pipeline.source = _CursorOnlySource(pipeline.source.config)
        milestones: dict[float, float] = {}  # fraction of `events` published -> when

        async def watch() -> None:
            while len(milestones) < 3:
                published = relay.pipelines[0].published if relay.pipelines else 0
                for fraction in (0.0, 0.1, 0.9):
                    if fraction not in milestones and published > fraction * events:
                        milestones[fraction] = time.perf_counter()
                await asyncio.sleep(0.005)  # (fine enough for seconds-long drains, and cheap)

        watcher = asyncio.create_task(watch())
        started = time.perf_counter()
        code = await relay.run(drain=True)
        seconds = time.perf_counter() - started
        watcher.cancel()
        assert code == 0
        published = relay.pipelines[0].published
        assert published == events, f"relay published {published} of {events}"
        return Drain(
            published,
            seconds,
            first_ack_s=milestones[0.0] - started,
            steady_per_s=0.8 * events / (milestones[0.9] - milestones[0.1]),
        )

    tune_garbage_collector()
    return asyncio.run(main())


def drain_in_child(dsn: str, sink: dict[str, Any], events: int, reading: str = "floor") -> Drain:
    """`drain_in_process` in a new Python process: each measurement starts from the same clean
    state (no heap, threads or caches left over from earlier measurements in this process)."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.drain_child", json.dumps([dsn, sink, events, reading])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"drain to {sink['type']} failed:\n{out.stderr[-3000:]}")
    return Drain(**json.loads(out.stdout.splitlines()[-1]))


def relay_drain(dsn: str, out: Path, events: int) -> Drain:
    return drain_in_process(dsn, {"type": "file", "path": str(out)}, events)


def _config_file(directory: Path, dsn: str, sink_path: str) -> Path:
    config = relay_config(dsn, {"type": "file", "path": sink_path})
    config["log"] = {"format": "json", "level": "warning"}
    path = directory / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def peak_rss(dsn: str, directory: Path, events: int) -> tuple[float, float, float]:
    """(peak RSS MB, seconds, events/s) of `outbox-relay run --drain` as its own process."""
    # A regular file: the file sink refuses /dev/null (a character device), and the relay exits 2.
    out = directory / "rss.jsonl"
    config = _config_file(directory, dsn, str(out))
    run = run_relay_watching_memory(config)
    out.unlink(missing_ok=True)
    assert run.code == 0, f"relay exited {run.code}"
    return run.peak_mb, run.seconds, events / run.seconds


def steady_latency(dsn: str, directory: Path, rate: int, seconds: float) -> list[float]:
    out = directory / "latency.jsonl"
    out.touch()
    config = _config_file(directory, dsn, str(out))
    proc = subprocess.Popen([sys.executable, "-m", "outbox_relay", "run", "-c", str(config)])
    latencies: list[float] = []
    total = int(rate * seconds)
    stop = threading.Event()

    def tail() -> None:
        with out.open() as handle:
            buffer = ""
            while not stop.is_set() or len(latencies) < total:
                chunk = handle.readline()
                if not chunk:
                    if stop.is_set() and time.time() > deadline:
                        return
                    time.sleep(0.0005)
                    continue
                buffer += chunk
                if buffer.endswith("\n"):
                    now = time.time()
                    created = json.loads(buffer)["headers"]["created_at"]
                    latencies.append(now - _epoch(created))
                    buffer = ""

    deadline = time.time() + seconds + 30
    reader = threading.Thread(target=tail, daemon=True)
    try:
        time.sleep(1.0)  # relay up and listening
        reader.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            next_at = time.perf_counter()
            for i in range(total):
                conn.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                    " VALUES ('order', %s, 'OrderUpdated', %s)",
                    (f"order-{i % AGGREGATES}", json.dumps({"seq": i})),
                )
                next_at += 1.0 / rate
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
        stop.set()
        reader.join(timeout=40)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return latencies


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def read_floor_cost(dsn: str, directory: Path, events: int, rounds: int) -> dict[str, Any]:
    """(e): drains with the read floor and with reading ahead only, alternating, in new processes."""
    rates: dict[str, list[float]] = {"floor": [], "cursor": []}
    for round_number in range(rounds):
        order = ("floor", "cursor") if round_number % 2 == 0 else ("cursor", "floor")
        for reading in order:
            _reset(dsn, events)
            sink = {"type": "file", "path": str(directory / f"cost-{reading}.jsonl")}
            rates[reading].append(drain_in_child(dsn, sink, events, reading).per_s)
    floor, cursor = statistics.median(rates["floor"]), statistics.median(rates["cursor"])
    return {
        "e_floor_events_per_s": round(floor),
        "e_cursor_only_events_per_s": round(cursor),
        "e_floor_over_cursor": round(floor / cursor, 3),
        "e_rounds_floor": [round(r) for r in rates["floor"]],
        "e_rounds_cursor": [round(r) for r in rates["cursor"]],
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of (e).")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {}
    with start_postgres() as pg, tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        directory = Path(tmp)
        dsn = create_outbox_database(pg)

        _reset(dsn, args.events)
        moved, seconds = bare_loop(dsn)
        report["a_bare_loop_rows_per_s"] = round(moved / seconds)

        _reset(dsn, args.events)
        report["b_relay_events_per_s"] = round(relay_drain(dsn, directory / "drain.jsonl", args.events).per_s)
        report["ratio_b_over_a"] = round(report["b_relay_events_per_s"] / report["a_bare_loop_rows_per_s"], 3)

        _reset(dsn, args.rss_events)
        rss, seconds, rate = peak_rss(dsn, directory, args.rss_events)
        report["rss_backlog_events"] = args.rss_events
        report["rss_peak_mb"] = round(rss, 1)
        report["rss_run_events_per_s"] = round(rate)

        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox")
        latencies = steady_latency(dsn, directory, args.rate, args.seconds)
        report["latency_events"] = len(latencies)
        report["latency_rate_per_s"] = args.rate
        if latencies:
            report["latency_p50_ms"] = round(_pct(latencies, 0.50) * 1000, 2)
            report["latency_p99_ms"] = round(_pct(latencies, 0.99) * 1000, 2)
            report["latency_max_ms"] = round(max(latencies) * 1000, 2)

        report |= read_floor_cost(dsn, directory, args.events, args.rounds)
    for key, value in report.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()
