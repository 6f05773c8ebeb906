"""`outbox-relay drill`: prove "no loss, order per aggregate" against a real setup.

It writes events at a steady rate in small transactions like an application, runs the relay as
child processes (several replicas if asked), SIGKILLs them at random moments, optionally freezes
the active one or cuts it off from the database (relay.drill_faults), pauses the broker and
restarts the database, reads everything back with an independent consumer (the sink plugin's
DeliveryReader) and reports: written, delivered, lost, duplicates, order violations per
aggregate, end-to-end latency, time to drain, and how long each fault took to be taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from outbox_relay.config import OutboxConfig, RelayConfig
from outbox_relay.drill_faults import (
    CUT_MODES,
    FAULT_KINDS,
    FREEZE,
    FaultContext,
    FaultRecord,
    FaultSetupError,
    LeaseWatch,
    fault_loop,
    proxy_target,
    same_database,
    through_proxy,
)
from outbox_relay.drill_proxy import CutoffProxy
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import ConnectorError, Delivered
from outbox_relay.logs import get_logger
from outbox_relay.registry import sink_plugins
from outbox_relay.runner import build_source


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
    #: Freeze (SIGSTOP) the replica that holds the lease this often, for `freeze_for` (None:
    #: twice the outbox's lease time), then SIGCONT it.
    freeze_every: float | None = None
    freeze_for: float | None = None
    #: Cut the replica that holds the lease off from the database this often, for `cut_for`
    #: (None: twice the lease time): close, hold, or both in turn (relay.drill_faults).
    cut_every: float | None = None
    cut_mode: str = "both"
    cut_for: float | None = None

    def faults_on_the_active_replica(self) -> bool:
        return bool(self.freeze_every or self.cut_every)


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
    #: Faults done to the active replica, by kind (freeze, cut-close, cut-hold).
    faults: dict[str, int] = field(default_factory=dict)
    #: By fault kind: faults, taken_over (takeovers seen), and the min/median/max seconds from a
    #: fault's start until the lease row showed another holder.
    takeover_seconds: dict[str, dict[str, float | int]] = field(default_factory=dict)
    #: The repeats the README promises at most: pipeline.max_in_flight (and, for logical
    #: replication, one transaction) per interruption (kill, fault, outage, restart).
    duplicates_bound: int = 0
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
            f"  duplicates         {self.duplicates} (at most {self.duplicates_bound} by the README's"
            " bound: max_in_flight per interruption)",
            f"  order violations   {self.order_violations} (in {self.aggregates_with_violations} aggregates)",
            f"  end-to-end latency p99 {self.latency_p99_ms:.1f} ms, max {self.latency_max_ms:.1f} ms",
            f"  time to drain      {self.drain_seconds:.1f}s after the last write",
            f"  chaos              {self.kills} SIGKILLs across {self.replicas} replica(s),"
            f" {self.broker_outages} broker outage(s), {self.db_restarts} database restart(s)",
        ]
        if self.faults:
            done = ", ".join(f"{count} {kind}" for kind, count in self.faults.items())
            lines.append(f"  faults             {done} (of the replica holding the lease)")
        for kind, seen in self.takeover_seconds.items():
            taken = f"{seen['taken_over']} of {seen['faults']} taken over"
            if seen["taken_over"]:
                taken += (
                    f" after min {seen['min']:.2f}s, median {seen['median']:.2f}s, max {seen['max']:.2f}s"
                )
            lines.append(f"  takeover {kind:<9} {taken}")
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
    """Relay child processes, one per slot, each on its own copy of the config (HTTP port off)
    and, for the cut faults, behind its own proxy to the database. A slot whose relay died is
    filled again with a new one on the same config and proxy."""

    def __init__(self, configs: list[Path], logs: Path, proxies: list[CutoffProxy | None]) -> None:
        self._configs, self._logs, self._proxies = configs, logs, proxies
        self._slots: list[subprocess.Popen[bytes] | None] = [None] * len(configs)
        self._log_of: dict[int, Path] = {}
        self.kills = 0
        #: Relays that exited without being killed by the drill (a note each).
        self.exits: list[str] = []

    def _spawn(self, slot: int) -> None:
        path = self._logs / f"relay-{len(self._log_of)}.log"
        with path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox_relay", "run", "-c", str(self._configs[slot])],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the drill reaches the drill, not the relays
            )
        self._log_of[proc.pid] = path
        self._slots[slot] = proc

    def fill(self) -> None:
        for slot, proc in enumerate(self._slots):
            if proc is not None and proc.poll() is not None:
                self.exits.append(
                    f"relay pid {proc.pid} exited by itself ({proc.returncode}): {self._last_line(proc.pid)}"
                )
            if proc is None or proc.poll() is not None:
                self._spawn(slot)

    def _last_line(self, pid: int) -> str:
        lines = self._log_of[pid].read_bytes().decode(errors="replace").strip().splitlines()
        return lines[-1][-300:] if lines else "(no log)"

    def alive(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        return [(slot, p) for slot, p in enumerate(self._slots) if p is not None and p.poll() is None]

    def ever_started(self, pid: int) -> bool:
        return pid in self._log_of

    def proxy(self, slot: int) -> CutoffProxy | None:
        return self._proxies[slot]

    def kill_one(self) -> None:
        alive = self.alive()
        if alive:
            slot, victim = random.choice(alive)
            victim.kill()  # (a frozen one too)
            victim.wait()
            self._slots[slot] = None
            self.kills += 1
        self.fill()

    def stop(self) -> None:
        for _, proc in self.alive():
            proc.send_signal(signal.SIGCONT)  # (a frozen relay handles SIGTERM once it runs)
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for stopping in self._slots:
            if stopping is None:
                continue
            try:
                stopping.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                stopping.kill()
                stopping.wait()


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


def check_plan(config: RelayConfig, index: int, plan: DrillPlan) -> None:
    """Raise ValueError (one line, no DSN in it) when the outbox cannot take the plan's faults."""
    outbox = config.outboxes[index]
    for flag, value in (("--freeze-for", plan.freeze_for), ("--cut-for", plan.cut_for)):
        if value is not None and value <= 0:
            raise FaultSetupError(f"{flag} must be more than 0")
    if plan.cut_mode not in CUT_MODES:
        raise FaultSetupError(f"--cut-mode must be one of {', '.join(CUT_MODES)}")
    if not plan.faults_on_the_active_replica():
        return
    where = f"outboxes[{index}] ({outbox.name})"
    if not outbox.lease.enabled:
        raise FaultSetupError(
            f"--freeze-every and --cut-every act on the relay that holds the lease, and {where}"
            " has lease.enabled: false"
        )
    if plan.replicas < 2:
        raise FaultSetupError(
            "--freeze-every and --cut-every need --replicas 2 or more: another relay must be there"
            " to take the lease over"
        )
    dsn = getattr(outbox.source, "dsn", None)
    if not isinstance(dsn, str):
        raise FaultSetupError(f"--freeze-every and --cut-every need a PostgreSQL source; {where} has none")
    if plan.cut_every:
        proxy_target(dsn)


def _proxied_dsns(outbox: OutboxConfig, box: dict[str, Any], proxy: CutoffProxy) -> None:
    """Point the source's DSN of `box` (the outbox's config as data), and the dead-letter DSN
    when it names the same database, at `proxy`."""
    dsn = box["source"]["dsn"]
    box["source"]["dsn"] = through_proxy(dsn, proxy.port)
    dead_letters = outbox.dead_letter.dsn
    if dead_letters is not None and same_database(dead_letters, dsn):
        box["dead_letter"]["dsn"] = through_proxy(dead_letters, proxy.port)


async def run_drill(config: RelayConfig, index: int, plan: DrillPlan) -> DrillReport:
    check_plan(config, index, plan)
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
    record = FaultRecord()
    dsn = str(getattr(outbox.source, "dsn", ""))
    with contextlib.ExitStack() as cleanup:
        directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="outbox-relay-drill-")))
        proxies: list[CutoffProxy | None] = [None] * plan.replicas
        if plan.cut_every:
            host, port = proxy_target(dsn)
            proxies = [cleanup.enter_context(CutoffProxy(host, port)) for _ in range(plan.replicas)]
        configs = [
            _child_config(config, outbox, directory, slot, proxies[slot]) for slot in range(plan.replicas)
        ]
        replicas = _Replicas(configs, directory, proxies)
        watch = LeaseWatch(
            dsn, outbox.name, outbox.lease.table, outbox.source.lease_scope(), outbox.source.lease_resolves()
        )
        faults = FaultContext(replicas, watch, outbox.lease.time, record, asyncio.Event(), log=log)
        await reader.start(fields)
        writing_done = faults.done
        try:
            replicas.fill()
            collector = asyncio.create_task(_collect(reader, tally))
            chaos = [asyncio.create_task(_kill_randomly(replicas, plan, writing_done))]
            chaos += _fault_loops(faults, plan)
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
            writing_done.set()  # (the chaos ends too when the drill does not finish)
            replicas.stop()
            await watch.close()
            await reader.close()
            await writer_source.close()
        report.kills = replicas.kills
        report.notes += replicas.exits
    delivered = tally.first_seen.keys() & written_ids
    report.written = len(written_ids)
    report.delivered = len(delivered)
    report.lost = len(written_ids - delivered)
    report.duplicates = tally.duplicates
    report.order_violations = sum(tally.violations.values())
    report.aggregates_with_violations = len(tally.violations)
    report.faults = {kind: record.counts[kind] for kind in FAULT_KINDS if record.counts.get(kind)}
    report.takeover_seconds = record.summary()
    report.notes += record.notes
    for kind, seen in report.takeover_seconds.items():
        if seen["taken_over"] < seen["faults"]:
            report.notes.append(
                f"{int(seen['faults']) - int(seen['taken_over'])} {kind} fault(s) not taken over by another"
                " relay during the fault and one lease time after it: the faulted relay kept the lease or"
                " took it back (was another one standing by? is the fault longer than lease.time?)"
            )
    report.duplicates_bound = _duplicates_bound(outbox, report, max(len(t) for t in transactions))
    if report.duplicates > report.duplicates_bound:
        report.notes.append("more duplicates than the README's bound (max_in_flight per interruption)")
    if tally.first_seen:
        report.drain_seconds = max(max(tally.first_seen.values()) - finished_writing, 0.0)
    if tally.latencies:
        ordered = sorted(tally.latencies)
        report.latency_p99_ms = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
        report.latency_max_ms = ordered[-1] * 1000
    return report


def _fault_loops(ctx: FaultContext, plan: DrillPlan) -> list[asyncio.Task[None]]:
    """A task for the freezes and one for the cuts; they take turns on the active replica."""
    loops = []
    if plan.freeze_every:
        lasting = plan.freeze_for or 2 * ctx.lease_time
        loops.append(fault_loop(ctx, (FREEZE,), plan.freeze_every, lasting))
    if plan.cut_every:
        lasting = plan.cut_for or 2 * ctx.lease_time
        loops.append(fault_loop(ctx, CUT_MODES[plan.cut_mode], plan.cut_every, lasting))
    return [asyncio.create_task(loop) for loop in loops]


def _duplicates_bound(outbox: OutboxConfig, report: DrillReport, largest_transaction: int) -> int:
    """README, "At-least-once, with a bounded number of repeats": after a crash at most
    `max_in_flight` events are sent again (logical replication: plus one transaction). Every
    interruption of the drill counts as one."""
    per_interruption = outbox.pipeline.max_in_flight
    if outbox.source.type == "postgres-logical":
        per_interruption += largest_transaction
    interruptions = report.kills + sum(report.faults.values()) + report.broker_outages + report.db_restarts
    return interruptions * per_interruption


def _child_config(
    config: RelayConfig, outbox: OutboxConfig, directory: Path, slot: int, proxy: CutoffProxy | None
) -> Path:
    data = config.model_dump(mode="json")
    box = outbox.model_dump(mode="json")
    if proxy is not None:
        _proxied_dsns(outbox, box, proxy)
    data["outboxes"] = [box]
    data["http"] = {"port": 0}
    data["log"] = {"format": "json", "level": "info"}
    path = directory / f"relay-{slot}.yaml"
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
