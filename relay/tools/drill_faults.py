"""The faults `drill` does to the ACTIVE replica, and how long until another one takes over.

- freeze: SIGSTOP the replica that holds the lease, SIGCONT it `for` later (a paused VM, a long
  GC pause, a hung event loop);
- cut-close: every connection of that replica to the database is closed and new ones are
  refused, through a proxy of the drill's own (relay.tools.drill_proxy) between each replica and the
  database; `forward()` again afterwards;
- cut-hold: the same proxy keeps that replica's connections open but forwards nothing either
  way (a NAT, a firewall or a proxy that stopped relaying: no error, every wait just lasts).

Who is active is read from the lease row (relay.leadership), on a connection of the drill's
own, straight to the database; the takeover time of a fault runs from its start until that row
shows another holder with a later token. After the fault the replica stays running: it must
find that it lost the lease and stand by.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay.identifiers import parse_table_name
from outbox_relay.leadership import holder_pid, locate_lease
from outbox_relay.pgsession import BoundedSession, database_place
from outbox_relay.tools.drill_proxy import CutoffProxy

FREEZE, CUT_CLOSE, CUT_HOLD = "freeze", "cut-close", "cut-hold"
FAULT_KINDS = (FREEZE, CUT_CLOSE, CUT_HOLD)
#: --cut-mode: which cut each fault is ("both" alternates, close first).
CUT_MODES = {"close": (CUT_CLOSE,), "hold": (CUT_HOLD,), "both": (CUT_CLOSE, CUT_HOLD)}

#: How often the lease row is read while a fault runs: the takeover times' resolution.
_WATCH_INTERVAL = 0.05
_QUERY_BOUND = 2.0


class FaultSetupError(ValueError):
    """The config cannot take the faults asked for (said in one line, without the DSN)."""


# --- the database behind a proxy ---------------------------------------------------------------


def proxy_target(dsn: str) -> tuple[str, int]:
    """Where a proxy in front of the database at `dsn` must connect: its hostaddr (else host)
    and port (default 5432), as libpq would read them (PGHOST, PGHOSTADDR, PGPORT included).
    Raises FaultSetupError for several hosts or a Unix socket: the proxy speaks TCP."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or os.environ.get("PGHOST") or "")
    address = str(params.get("hostaddr") or os.environ.get("PGHOSTADDR") or "")
    port = str(params.get("port") or os.environ.get("PGPORT") or "5432")
    if "," in host or "," in address or "," in port:
        raise FaultSetupError(
            "the cut fault puts a proxy between each relay and one database server: the source's"
            " DSN names several hosts; give it one"
        )
    if not address and (not host or host.startswith(("/", "@"))):
        raise FaultSetupError(
            "the cut fault puts a TCP proxy between each relay and the database: the source's DSN"
            " connects through a Unix socket; give it the server's TCP host and port"
        )
    if not port.strip().isdigit():
        raise FaultSetupError("the source's DSN has a port that is not a number")
    return address or host, int(port)


def through_proxy(dsn: str, proxy_port: int) -> str:
    """`dsn` reaching the database through a proxy on 127.0.0.1:`proxy_port`: `host` stays (TLS
    verifies the server's name against it), the address and port are the proxy's."""
    return make_conninfo(dsn, hostaddr="127.0.0.1", port=str(proxy_port))


def same_database(one: str, other: str) -> bool:
    return database_place(one) == database_place(other)


# --- who holds the lease ---------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseRow:
    holder: str
    token: int


class LeaseWatch:
    """Reads one outbox's lease row on a connection of its own, straight to the database."""

    def __init__(self, dsn: str, outbox: str, table: str, scope: str, resolve: str | None) -> None:
        self._where = (outbox, table, scope, resolve)
        self._query: sql.Composed | None = None
        self._key = ""
        self._session = BoundedSession(
            partial(
                psycopg.AsyncConnection.connect,
                dsn,
                autocommit=True,
                connect_timeout=2,
                application_name="outbox-relay drill",
            ),
            _QUERY_BOUND,
        )

    async def current(self) -> LeaseRow | None:
        """The lease's holder now, or None: expired, never taken, or the database did not
        answer (the lease table may not exist before the first relay creates it)."""
        try:
            if self._query is None:
                # Where the relays keep it: names resolved as they resolve them.
                place = await locate_lease(self._session.query, *self._where)
                self._key = place.key
                self._query = sql.SQL(
                    "SELECT holder, token FROM {} WHERE lease = %s AND expires_at > clock_timestamp()"
                ).format(parse_table_name(place.table).identifier())
            rows = await self._session.query(self._query, (self._key,))
        except (psycopg.Error, OSError, TimeoutError):
            await self.close()
            return None
        if not rows or rows[0][0] is None:
            return None
        return LeaseRow(str(rows[0][0]), int(rows[0][1]))

    async def close(self) -> None:
        await self._session.close()


# --- the record ---------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    """Faults done, by kind, and the takeover times measured."""

    counts: dict[str, int] = field(default_factory=dict)
    takeovers: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def summary(self) -> dict[str, dict[str, float | int]]:
        """Per fault kind: faults, takeovers measured, min/median/max seconds."""
        found: dict[str, dict[str, float | int]] = {}
        for kind in FAULT_KINDS:
            if not self.counts.get(kind):
                continue
            times = self.takeovers.get(kind, [])
            entry: dict[str, float | int] = {"faults": self.counts[kind], "taken_over": len(times)}
            if times:
                entry |= {"min": min(times), "median": statistics.median(times), "max": max(times)}
            found[kind] = entry
        return found


# --- the faults ---------------------------------------------------------------------------------


class ReplicaSet(Protocol):
    """What the faults need of the drill's relay processes (relay.tools.drill_replicas.Replicas)."""

    def alive(self) -> list[tuple[int, subprocess.Popen[bytes]]]:
        """(slot, process) of each running relay."""
        ...

    def ever_started(self, pid: int) -> bool:
        """Whether the drill started a relay with this pid (running or not)."""
        ...

    def proxy(self, slot: int) -> CutoffProxy | None:
        """The proxy between the relay in `slot` and the database (None: no cut faults)."""
        ...


@dataclass
class FaultContext:
    replicas: ReplicaSet
    watch: LeaseWatch
    lease_time: float
    record: FaultRecord
    done: asyncio.Event
    #: One fault on the active replica at a time: each must have a standby to take over.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    log: Any = None
    #: Holders of the lease that are not the drill's relays, and when each was first seen.
    foreign: dict[str, float] = field(default_factory=dict)


async def fault_loop(ctx: FaultContext, kinds: tuple[str, ...], every: float, lasting: float) -> None:
    """Until `done`: wait a random 0.5 to 1.5 times `every`, then do the next of `kinds` (in
    turn) to the active replica for `lasting` seconds."""
    turn = 0
    while not ctx.done.is_set():
        try:
            await asyncio.wait_for(ctx.done.wait(), random.uniform(0.5, 1.5) * every)
            return
        except TimeoutError:
            pass
        async with ctx.lock:
            if ctx.done.is_set():
                return
            if await one_fault(ctx, kinds[turn % len(kinds)], lasting):
                turn += 1


async def one_fault(ctx: FaultContext, kind: str, lasting: float) -> bool:
    """Do `kind` to the replica that holds the lease for `lasting` seconds and measure how long
    until another holds it. False when no replica of the drill held the lease."""
    found = await _active_replica(ctx, timeout=2 * ctx.lease_time)
    if found is None:
        ctx.record.note(
            f"no relay of the drill held the lease for {2 * ctx.lease_time:g}s: a {kind} was skipped"
        )
        return False
    slot, proc, before = found
    start, stop = _fault_actions(ctx, kind, slot, proc)
    if ctx.log is not None:
        ctx.log.info("drill: fault on the active relay", fault=kind, pid=proc.pid, seconds=lasting)
    started = time.monotonic()
    start()
    ctx.record.counts[kind] = ctx.record.counts.get(kind, 0) + 1
    try:
        taken = await _takeover(ctx.watch, before, started + lasting)
        await asyncio.sleep(max(started + lasting - time.monotonic(), 0))
    finally:  # (also when the drill is cancelled: no relay is left frozen or cut off)
        stop()
    if taken is None:  # a takeover still under way when the fault ended counts too
        taken = await _takeover(ctx.watch, before, time.monotonic() + ctx.lease_time)
    if taken is not None:
        ctx.record.takeovers.setdefault(kind, []).append(taken - started)
    return True


def _fault_actions(
    ctx: FaultContext, kind: str, slot: int, proc: subprocess.Popen[bytes]
) -> tuple[Callable[[], None], Callable[[], None]]:
    if kind == FREEZE:
        # (send_signal skips a process that has exited: a kill may take the frozen one)
        return (lambda: proc.send_signal(signal.SIGSTOP)), (lambda: proc.send_signal(signal.SIGCONT))
    proxy = ctx.replicas.proxy(slot)
    assert proxy is not None, "cut faults need the replicas behind proxies"
    return (proxy.cut if kind == CUT_CLOSE else proxy.hold), proxy.forward


async def _active_replica(
    ctx: FaultContext, timeout: float
) -> tuple[int, subprocess.Popen[bytes], LeaseRow] | None:
    """The replica (slot, process) whose pid the lease row names, with the row."""
    here = f"{socket.gethostname()} pid "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await ctx.watch.current()
        pid = holder_pid(row.holder) if row is not None and row.holder.startswith(here) else None
        for slot, proc in ctx.replicas.alive():
            if row is not None and proc.pid == pid:
                return slot, proc, row
        if row is not None and (pid is None or not ctx.replicas.ever_started(pid)):
            # (A relay stopped just before the drill may leave its lease to expire: only one
            # that is still renewed a lease time later is running.)
            first_seen = ctx.foreign.setdefault(row.holder, time.monotonic())
            if time.monotonic() - first_seen > ctx.lease_time:
                ctx.record.note(
                    f"the lease was held by {row.holder!r}, not one of the drill's relays: another relay"
                    " runs on this outbox (the faults wait for the lease to come to one of the drill's)"
                )
        await asyncio.sleep(_WATCH_INTERVAL)
    return None


async def _takeover(watch: LeaseWatch, before: LeaseRow, until: float) -> float | None:
    """When (monotonic) the lease row showed another holder with a later token, or None by
    `until`."""
    while time.monotonic() < until:
        row = await watch.current()
        if row is not None and row.holder != before.holder and row.token > before.token:
            return time.monotonic()
        await asyncio.sleep(_WATCH_INTERVAL)
    return None
