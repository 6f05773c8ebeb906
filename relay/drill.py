"""`outbox-relay drill`: prove "no loss, order per aggregate" against a real setup.

It writes events at a steady rate in small transactions like an application, runs the relay as
child processes (several replicas if asked), SIGKILLs them at random moments, optionally pauses
the broker and restarts the database, reads everything back with an independent consumer (the
sink plugin's DeliveryReader) and reports: written, delivered, lost, duplicates, order
violations per aggregate, end-to-end latency, and time to drain.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import yaml

from relay.config import OutboxConfig, RelayConfig
from relay.events import OutboxEvent
from relay.interfaces import ConnectorError, Delivered
from relay.logs import get_logger
from relay.registry import sink_plugins
from relay.runner import build_source


@dataclass(frozen=True)
class DrillPlan:
    events: int = 100_000
    aggregates: int = 1_000
    rate: float = 2_000.0
    kill_every: float | None = 2.0
    replicas: int = 1
    broker_outage: float | None = None
    broker_pid: int | None = None
    broker_stop_command: str | None = None
    broker_start_command: str | None = None
    db_restart_command: str | None = None
    drain_timeout: float = 300.0


@dataclass
class DrillReport:
    run_id: str
    outbox: str
    written: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    aggregates_with_violations: int = 0
    latency_p99_ms: float = 0.0
    latency_max_ms: float = 0.0
    write_seconds: float = 0.0
    drain_seconds: float = 0.0
    kills: int = 0
    replicas: int = 1
    broker_outages: int = 0
    db_restarts: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.order_violations == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def as_text(self) -> str:
        lines = [
            f"drill {self.run_id} on outbox {self.outbox}: {'PASSED' if self.passed else 'FAILED'}",
            f"  written            {self.written} events in {self.write_seconds:.1f}s",
            f"  delivered          {self.delivered} distinct",
            f"  lost               {self.lost}",
            f"  duplicates         {self.duplicates}",
            f"  order violations   {self.order_violations} (in {self.aggregates_with_violations} aggregates)",
            f"  end-to-end latency p99 {self.latency_p99_ms:.1f} ms, max {self.latency_max_ms:.1f} ms",
            f"  time to drain      {self.drain_seconds:.1f}s after the last write",
            f"  chaos              {self.kills} SIGKILLs across {self.replicas} replica(s),"
            f" {self.broker_outages} broker outage(s), {self.db_restarts} database restart(s)",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


class _Tally:
    """What the independent consumer saw, event by event."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.first_seen: dict[str, float] = {}
        self.latencies: list[float] = []
        self.duplicates = 0
        self.last_position: dict[str, int] = defaultdict(lambda: -1)
        self.violations: dict[str, int] = defaultdict(int)

    def add(self, messages: list[Delivered]) -> None:
        for message in messages:
            headers = message.headers
            if headers.get("drill_run") != self.run_id:
                continue  # someone else's events on the same topic or queue
            event_id = headers["event_id"]
            if event_id in self.first_seen:
                self.duplicates += 1
                continue
            self.first_seen[event_id] = message.received_at
            created = datetime.fromisoformat(headers["created_at"]).timestamp()
            self.latencies.append(message.received_at - created)
            aggregate, position = headers["aggregate_id"], int(headers["position"])
            if position < self.last_position[aggregate]:
                self.violations[aggregate] += 1
            self.last_position[aggregate] = max(position, self.last_position[aggregate])


class _Replicas:
    """Relay child processes on a copy of the config with the HTTP port off."""

    def __init__(self, config_path: Path, count: int, logs: Path) -> None:
        self._config_path, self._count, self._logs = config_path, count, logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.kills = 0

    def spawn(self) -> None:
        log = (self._logs / f"relay-{len(self.procs) + self.kills}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "relay", "run", "-c", str(self._config_path)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the drill reaches the drill, not the relays
            )
        )

    def fill(self) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]
        while len(self.procs) < self._count:
            self.spawn()

    def kill_one(self) -> None:
        alive = [p for p in self.procs if p.poll() is None]
        if alive:
            victim = random.choice(alive)
            victim.kill()
            victim.wait()
            self.kills += 1
        self.fill()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _events(run_id: str, plan: DrillPlan, aggregate_type: str) -> list[list[OutboxEvent]]:
    """Transactions of 1 to 3 events of one aggregate, round-robin over the aggregates."""
    transactions: list[list[OutboxEvent]] = []
    written, turn = 0, 0
    while written < plan.events:
        aggregate = f"drill-{run_id}-{turn % plan.aggregates}"
        size = min(1 + turn % 3, plan.events - written)
        transactions.append(
            [
                OutboxEvent(
                    0,
                    str(uuid.uuid4()),
                    aggregate_type,
                    aggregate,
                    "DrillEvent",
                    orjson.dumps({"seq": written + i, "aggregate": aggregate}),
                    {"drill_run": run_id},
                    0.0,
                )
                for i in range(size)
            ]
        )
        written += size
        turn += 1
    return transactions


async def run_drill(config: RelayConfig, index: int, plan: DrillPlan) -> DrillReport:
    outbox = config.outboxes[index]
    plugin = sink_plugins()[outbox.sink.type]
    if plugin.reader is None:
        raise ConnectorError(f"sink type {outbox.sink.type} has no reader: it cannot be drilled")
    run_id = uuid.uuid4().hex[:8]
    log = get_logger(outbox=outbox.name, drill=run_id)
    report = DrillReport(run_id, outbox.name, replicas=plan.replicas)
    aggregate_type = "drill"
    transactions = _events(run_id, plan, aggregate_type)
    fields = [txn[0].template_fields() for txn in transactions[: plan.aggregates]]
    reader = plugin.reader(outbox.sink)
    writer_source = build_source(outbox, index)
    tally = _Tally(run_id)
    with tempfile.TemporaryDirectory(prefix="outbox-relay-drill-") as tmp:
        directory = Path(tmp)
        child_config = _child_config(config, outbox, directory)
        replicas = _Replicas(child_config, plan.replicas, directory)
        await reader.start(fields)
        writing_done = asyncio.Event()
        try:
            replicas.fill()
            collector = asyncio.create_task(_collect(reader, tally))
            chaos = [asyncio.create_task(_kill_randomly(replicas, plan, writing_done))]
            if plan.broker_outage:
                chaos.append(asyncio.create_task(_broker_outage(plan, report, log)))
            if plan.db_restart_command:
                chaos.append(asyncio.create_task(_db_restart(plan, report, log)))
            started = time.monotonic()
            await _write(writer_source, transactions, plan.rate)
            report.write_seconds = time.monotonic() - started
            writing_done.set()
            await asyncio.gather(*chaos)
            replicas.fill()
            written_ids = {e.event_id for txn in transactions for e in txn}
            finished_writing = time.time()
            deadline = time.monotonic() + plan.drain_timeout
            while len(tally.first_seen.keys() & written_ids) < len(written_ids):
                if time.monotonic() > deadline:
                    report.notes.append(f"gave up waiting after {plan.drain_timeout:g}s of drain")
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(1.0)  # late duplicates count too
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
        finally:
            replicas.stop()
            await reader.close()
            await writer_source.close()
        report.kills = replicas.kills
    delivered = tally.first_seen.keys() & written_ids
    report.written = len(written_ids)
    report.delivered = len(delivered)
    report.lost = len(written_ids - delivered)
    report.duplicates = tally.duplicates
    report.order_violations = sum(tally.violations.values())
    report.aggregates_with_violations = len(tally.violations)
    if tally.first_seen:
        report.drain_seconds = max(max(tally.first_seen.values()) - finished_writing, 0.0)
    if tally.latencies:
        ordered = sorted(tally.latencies)
        report.latency_p99_ms = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
        report.latency_max_ms = ordered[-1] * 1000
    return report


def _child_config(config: RelayConfig, outbox: OutboxConfig, directory: Path) -> Path:
    data = config.model_dump(mode="json")
    data["outboxes"] = [outbox.model_dump(mode="json")]
    data["http"] = {"port": 0}
    data["log"] = {"format": "json", "level": "info"}
    path = directory / "relay.yaml"
    path.touch(mode=0o600)  # it holds the DSN
    path.write_text(yaml.safe_dump(data))
    return path


async def _write(source: Any, transactions: list[list[OutboxEvent]], rate: float) -> None:
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    for transaction in transactions:
        now = time.time()
        for event in transaction:
            event.created_at = now
        while True:
            try:
                await source.write(transaction)
                break
            except Exception:  # the database may be restarting: an application would retry too
                await asyncio.sleep(0.2)
        next_at += interval * len(transaction)
        pause = next_at - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)


async def _collect(reader: Any, tally: _Tally) -> None:
    while True:
        try:
            tally.add(await reader.poll())
        except Exception:  # a broker outage also stalls the reader: keep trying
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.05)


async def _kill_randomly(replicas: _Replicas, plan: DrillPlan, done: asyncio.Event) -> None:
    if not plan.kill_every:
        return
    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), random.uniform(0.5, 1.5) * plan.kill_every)
        except TimeoutError:
            replicas.kill_one()


async def _broker_outage(plan: DrillPlan, report: DrillReport, log: Any) -> None:
    """Pause a local broker process (SIGSTOP/SIGCONT), or stop and start it with commands."""
    assert plan.broker_outage
    await asyncio.sleep(min(2.0, plan.events / plan.rate / 3))
    log.info("drill: broker outage", seconds=plan.broker_outage)
    if plan.broker_pid is not None:
        os.kill(plan.broker_pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(plan.broker_outage)
        finally:
            os.kill(plan.broker_pid, signal.SIGCONT)
    else:
        assert plan.broker_stop_command and plan.broker_start_command
        if not await _shell(plan.broker_stop_command, report, "broker stop"):
            return
        await asyncio.sleep(plan.broker_outage)
        if not await _shell(plan.broker_start_command, report, "broker start"):
            return
    report.broker_outages += 1


async def _shell(command: str, report: DrillReport, what: str) -> bool:
    result = await asyncio.to_thread(
        subprocess.run, command, shell=True, capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        detail = result.stderr.strip()[:200]
        report.notes.append(f"{what} command failed ({result.returncode}): {detail}")
    return result.returncode == 0


async def _db_restart(plan: DrillPlan, report: DrillReport, log: Any) -> None:
    assert plan.db_restart_command
    await asyncio.sleep(plan.events / plan.rate * 2 / 3)
    log.info("drill: restarting the database")
    if await _shell(plan.db_restart_command, report, "database restart"):
        report.db_restarts += 1
