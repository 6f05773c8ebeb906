"""`outbox-relay drill`: prove "no loss, order per aggregate" against a real setup.

It writes events at a steady rate in small transactions like an application, runs the relay as
child processes (several replicas if asked), SIGKILLs them at random moments, optionally freezes
the active one or cuts it off from the database (relay.tools.drill_faults), pauses the broker and
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
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from outbox_relay.assembly import build_source
from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.config import OutboxConfig, RelayConfig
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import ConnectorError
from outbox_relay.logs import get_logger
from outbox_relay.progress import Fields, RateMeter, showing
from outbox_relay.registry import sink_plugins
from outbox_relay.tools.drill_faults import (
    CUT_MODES,
    FAULT_KINDS,
    FREEZE,
    FaultContext,
    FaultRecord,
    FaultSetupError,
    LeaseWatch,
    fault_loop,
    proxy_target,
)
from outbox_relay.tools.drill_proxy import CutoffProxy
from outbox_relay.tools.drill_replicas import Replicas, child_config
from outbox_relay.tools.drill_report import DrillPlan, DrillReport, Tally, duplicates_bound


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
    dsn = outbox.source.database()
    if not isinstance(dsn, str):
        raise FaultSetupError(f"--freeze-every and --cut-every need a PostgreSQL source; {where} has none")
    if plan.cut_every:
        proxy_target(dsn)


@dataclass
class _Drill:
    """One drill's plan and what it gathers as it runs."""

    outbox: OutboxConfig
    plan: DrillPlan
    report: DrillReport
    transactions: list[list[OutboxEvent]]
    reader: Any
    tally: Tally
    record: FaultRecord = field(default_factory=FaultRecord)
    log: Any = None
    #: Events written so far, and whether the writing is over (for the progress line).
    written: int = 0
    draining: bool = False


async def run_drill(config: RelayConfig, index: int, plan: DrillPlan) -> DrillReport:
    """Run the drill on outbox `index`; what the independent consumer saw, as a report. Raises
    ValueError for a plan the outbox cannot take, ConnectorError for a sink without a reader."""
    check_plan(config, index, plan)
    outbox = config.outboxes[index]
    plugin = sink_plugins()[outbox.sink.type]
    if plugin.reader is None:
        raise ConnectorError(f"sink type {outbox.sink.type} has no reader: it cannot be drilled")
    run_id = uuid.uuid4().hex[:8]
    drill = _Drill(
        outbox,
        plan,
        DrillReport(run_id, outbox.name, replicas=plan.replicas),
        _events(run_id, plan, "drill"),
        plugin.reader(outbox.sink),
        Tally(run_id),
        log=get_logger(outbox=outbox.name, drill=run_id),
    )
    writer_source = build_source(outbox, index)
    dsn = str(getattr(outbox.source, "dsn", ""))
    with contextlib.ExitStack() as cleanup:
        replicas = _replicas(cleanup, config, outbox, plan, dsn)
        watch = LeaseWatch(
            dsn, outbox.name, outbox.lease.table, outbox.source.lease_scope(), outbox.source.lease_resolves()
        )
        faults = FaultContext(
            replicas, watch, outbox.lease.time, drill.record, asyncio.Event(), log=drill.log
        )
        await drill.reader.start([txn[0].template_fields() for txn in drill.transactions[: plan.aggregates]])
        try:
            finished_writing = await _drive(drill, replicas, faults, writer_source)
        finally:
            faults.done.set()  # (the chaos ends too when the drill does not finish)
            replicas.stop()
            await watch.close()
            await drill.reader.close()
            await writer_source.close()
        drill.report.kills = replicas.kills
        drill.report.notes += replicas.exits
    _conclude(drill, finished_writing)
    return drill.report


def _replicas(
    cleanup: contextlib.ExitStack, config: RelayConfig, outbox: OutboxConfig, plan: DrillPlan, dsn: str
) -> Replicas:
    """The drill's relay processes (not started yet), each on its own config in a directory that
    `cleanup` removes (the configs hold the DSNs and the broker's credentials), logging there too
    unless the plan keeps the logs elsewhere, and behind its own proxy when the plan cuts relays
    off."""
    directory = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="outbox-relay-drill-")))
    logs = directory
    if plan.logs is not None:
        plan.logs.mkdir(parents=True, exist_ok=True)
        logs = Path(tempfile.mkdtemp(prefix="outbox-relay-drill-", dir=plan.logs))
    proxies: list[CutoffProxy | None] = [None] * plan.replicas
    if plan.cut_every:
        host, port = proxy_target(dsn)
        proxies = [cleanup.enter_context(CutoffProxy(host, port)) for _ in range(plan.replicas)]
    configs = [child_config(config, outbox, directory, slot, proxies[slot]) for slot in range(plan.replicas)]
    return Replicas(configs, logs, proxies)


async def _drive(drill: _Drill, replicas: Replicas, faults: FaultContext, writer_source: Any) -> float:
    """Write every event under the plan's chaos, then wait until the consumer saw them all (or
    the drain timeout passed); when the writing ended (time.time)."""
    plan, report = drill.plan, drill.report
    replicas.fill()
    collector = asyncio.create_task(_collect(drill.reader, drill.tally))
    try:
        chaos = [asyncio.create_task(_kill_randomly(replicas, plan, faults.done))]
        chaos += _fault_loops(faults, plan)
        if plan.broker_outage:
            chaos.append(asyncio.create_task(_broker_outage(plan, report, drill.log)))
        if plan.db_restart_command:
            chaos.append(asyncio.create_task(_db_restart(plan, report, drill.log)))
        started = time.monotonic()
        meter = RateMeter()
        async with showing(
            "drill", partial(_measure, drill, replicas, meter), partial(_counts, drill, replicas)
        ):
            await _write(writer_source, drill)
            report.write_seconds = time.monotonic() - started
            drill.draining = True
            faults.done.set()
            await asyncio.gather(*chaos)
            replicas.fill()
            finished_writing = time.time()
            await _drain(drill)
            await asyncio.sleep(1.0)  # late duplicates count too
        return finished_writing
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)


def _counts(drill: _Drill, replicas: Replicas) -> dict[str, object]:
    return {
        "phase": "draining" if drill.draining else "writing",
        "written": f"{drill.written}/{drill.plan.events}",
        "delivered": len(drill.tally.first_seen),
        "duplicates": drill.tally.duplicates,
        "kills": replicas.kills,
    }


async def _measure(drill: _Drill, replicas: Replicas, meter: RateMeter) -> Fields:
    return {**_counts(drill, replicas), "rate": f"{meter.rate(len(drill.tally.first_seen)):.0f}/s"}


def _written_ids(drill: _Drill) -> set[str]:
    return {event.event_id for transaction in drill.transactions for event in transaction}


async def _drain(drill: _Drill) -> None:
    """Wait until the consumer saw every written event, at most the plan's drain timeout."""
    written_ids = _written_ids(drill)
    deadline = time.monotonic() + drill.plan.drain_timeout
    while len(drill.tally.first_seen.keys() & written_ids) < len(written_ids):
        if time.monotonic() > deadline:
            drill.report.notes.append(f"gave up waiting after {drill.plan.drain_timeout:g}s of drain")
            return
        await asyncio.sleep(0.2)


def _conclude(drill: _Drill, finished_writing: float) -> None:
    """Fill the report in from the tally and the faults' record."""
    report, tally, record = drill.report, drill.tally, drill.record
    written_ids = _written_ids(drill)
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
    _note_faults_not_taken_over(report)
    largest_transaction = max(len(t) for t in drill.transactions)
    report.duplicates_bound = duplicates_bound(drill.outbox, report, largest_transaction)
    if report.duplicates > report.duplicates_bound:
        report.notes.append("more duplicates than the README's bound (max_in_flight per interruption)")
    if tally.first_seen:
        report.drain_seconds = max(max(tally.first_seen.values()) - finished_writing, 0.0)
    if tally.latencies:
        ordered = sorted(tally.latencies)
        report.latency_p99_ms = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
        report.latency_max_ms = ordered[-1] * 1000


def _note_faults_not_taken_over(report: DrillReport) -> None:
    for kind, seen in report.takeover_seconds.items():
        if seen["taken_over"] < seen["faults"]:
            report.notes.append(
                f"{int(seen['faults']) - int(seen['taken_over'])} {kind} fault(s) not taken over by another"
                " relay during the fault and one lease time after it: the faulted relay kept the lease or"
                " took it back (was another one standing by? is the fault longer than lease.time?)"
            )


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


#: Between attempts of the drill's own writer and reader while the database or the broker is away.
_RETRY = Backoff(initial=0.2, maximum=1.0)


async def _write(source: Any, drill: _Drill) -> None:
    """Write the drill's transactions at the plan's rate of events a second (the pauses between
    them are a cadence, not a retry), each retried until it is written, as an application would."""
    rate = drill.plan.rate
    interval = 1.0 / rate if rate > 0 else 0.0
    next_at = time.monotonic()
    retrying = Retrying(_RETRY)
    for transaction in drill.transactions:
        now = time.time()
        for event in transaction:
            event.created_at = now
        while True:
            try:
                await source.write(transaction)
                retrying.succeeded()
                break
            except Exception as exc:  # the database may be restarting: an application would retry too
                await asyncio.sleep(retrying.failed(exc))
        drill.written += len(transaction)
        next_at += interval * len(transaction)
        pause = next_at - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)


async def _collect(reader: Any, tally: Tally) -> None:
    """Poll the independent consumer into `tally` until cancelled."""
    retrying = Retrying(_RETRY)
    while True:
        try:
            tally.add(await reader.poll())
            retrying.succeeded()
        except Exception as exc:  # a broker outage also stalls the reader: keep trying
            await asyncio.sleep(retrying.failed(exc))
        await asyncio.sleep(0.05)  # (a cadence, not a retry)


async def _kill_randomly(replicas: Replicas, plan: DrillPlan, done: asyncio.Event) -> None:
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
        assert plan.broker_stop_command
        assert plan.broker_start_command
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
