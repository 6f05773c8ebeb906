"""Builds connectors from the config and runs one pipeline per outbox, with signals and HTTP."""

from __future__ import annotations

import asyncio
import gc
import signal
from functools import partial
from typing import Any

import psycopg
from psycopg import sql

from outbox_relay import metrics
from outbox_relay.assembly import SetupError, build_pipeline, build_pipelines
from outbox_relay.config import OutboxConfig, RelayConfig
from outbox_relay.deadletters import create_table_sql as create_dead_letter_table
from outbox_relay.deadletters import upgrade_table_sql as upgrade_dead_letter_table
from outbox_relay.http import HealthServer
from outbox_relay.identifiers import parse_table_name
from outbox_relay.interfaces import Source, Unsupported, database_source
from outbox_relay.leadership import Lease, LeaseLost, Term, lease_table_in, locate_lease
from outbox_relay.leadership import create_table_sql as create_lease_table
from outbox_relay.logs import get_logger
from outbox_relay.pgsession import SESSION_NAME, fetch_rows, session_conninfo, start_session
from outbox_relay.pipeline import Pipeline


def _lease_of(outbox: OutboxConfig, dsn: str) -> Lease:
    """The outbox's lease, as its config and its source place it."""
    return Lease(
        dsn,
        outbox.name,
        table=outbox.lease.table,
        lease_time=outbox.lease.time,
        check_interval=outbox.lease.check_interval,
        scope=outbox.source.lease_scope(),
        resolve=outbox.source.lease_resolves(),
    )


def database_setup(
    outbox: OutboxConfig, source: Source
) -> tuple[list[sql.Composed], list[tuple[str, list[sql.Composed]]]]:
    """What `init-db` runs for an outbox on fresh databases (and `--print-sql` prints): the
    statements for the source's database (the dead-letter table included when it lives there),
    and (dsn, statements) for the dead-letter database when `dead_letter.dsn` names another one."""
    statements = database_source(source, "set up a database").init_sql()
    here, elsewhere = _dead_letter_setup(outbox)
    return statements + here + _lease_setup(outbox), elsewhere


def _lease_setup(outbox: OutboxConfig) -> list[sql.Composed]:
    """The lease table, in the source's database, when the outbox runs under a lease; an
    unqualified one in the outbox table's schema when the config names it (the relay puts it
    where the server finds the outbox table: see relay.leadership.locate_lease)."""
    if not outbox.lease.enabled or outbox.source.database() is None:
        return []
    resolve = outbox.source.lease_resolves()
    schema = parse_table_name(resolve).schema if resolve is not None else None
    return [create_lease_table(lease_table_in(outbox.lease.table, schema).regclass_text())]


def _dead_letter_setup(
    outbox: OutboxConfig,
) -> tuple[list[sql.Composed], list[tuple[str, list[sql.Composed]]]]:
    dead_letter_dsn = outbox.dead_letter_dsn()
    if dead_letter_dsn is None:  # (`run` refuses to start so: see build_dead_letter_store)
        return [], []
    table: list[sql.Composed] = [
        create_dead_letter_table(outbox.dead_letter.table),
        *upgrade_dead_letter_table(outbox.dead_letter.table),
    ]
    if outbox.dead_letter.dsn in (None, outbox.source.database()):
        return table, []
    return [], [(dead_letter_dsn, table)]


async def set_up_database(outbox: OutboxConfig, source: Source) -> list[str]:
    """What `init-db` does for an outbox: the source sets up its database (see
    `Source.init_db`), then the dead-letter table is created where it lives. Each statement runs
    alone in autocommit: creating a replication slot is refused inside a transaction that wrote
    something. Returns the source's notes; raises ConnectorError or psycopg.Error."""
    dsn = outbox.source.database()
    if dsn is None:
        raise SetupError("this source has no database to set up")
    here, elsewhere = _dead_letter_setup(outbox)
    async with await psycopg.AsyncConnection.connect(
        session_conninfo(dsn), connect_timeout=10, autocommit=True
    ) as conn:
        await start_session(conn)
        notes = await database_source(source, "set up a database").init_db(conn)
        await _run_table_setup(conn, outbox.dead_letter.table, here)
        if _lease_setup(outbox):
            place = await locate_lease(
                partial(fetch_rows, conn),
                outbox.name,
                outbox.lease.table,
                outbox.source.lease_scope(),
                outbox.source.lease_resolves(),
            )
            await _run_table_setup(conn, place.table, [create_lease_table(place.table)])
    for other_dsn, statements in elsewhere:
        async with await psycopg.AsyncConnection.connect(
            session_conninfo(other_dsn), connect_timeout=10, autocommit=True
        ) as conn:
            await start_session(conn)
            await _run_table_setup(conn, outbox.dead_letter.table, statements)
    return notes


async def _run_table_setup(
    conn: psycopg.AsyncConnection[Any], table: str, statements: list[sql.Composed]
) -> None:
    """A table's statements (create, then upgrades); the create is skipped when the
    name already finds a table (an unqualified one further along the search_path: CREATE TABLE
    IF NOT EXISTS would make a second one in the path's first schema)."""
    if not statements:
        return
    cur = await conn.execute("SELECT to_regclass(%s)", (parse_table_name(table).regclass_text(),))
    found = await cur.fetchone()
    create, *rest = statements
    for statement in ([] if found and found[0] else [create]) + rest:
        await conn.execute(statement)


def _set_when_done(event: asyncio.Event, _: object) -> None:
    event.set()


_startup_frozen = False


def tune_garbage_collector() -> None:
    """Make CPython's cyclic garbage collector run far less often (`outbox-relay run` calls it
    once the configuration and connectors are loaded).

    The relay allocates and frees a handful of small objects per event (almost all freed at once
    by reference counting) while its in-flight window keeps up to `max_in_flight` events alive.
    With the default thresholds the collector ran about 1,000 young and 10 full collections per
    200,000 events, 10-15% of the relay's CPU, the full ones walking every object including all
    that startup built. Those are frozen out of the collector's sight (once per process), and a
    young collection waits for 10,000 net new objects instead of 700.
    """
    global _startup_frozen
    if not _startup_frozen:
        gc.collect()
        gc.freeze()
        _startup_frozen = True
    gc.set_threshold(10_000, 10, 10)


class Relay:
    """Every outbox of one config file, the HTTP endpoint, and signal handling."""

    def __init__(self, config: RelayConfig, pipelines: list[Pipeline] | None = None) -> None:
        self.config = config
        self.pipelines = pipelines if pipelines is not None else build_pipelines(config)
        self.stop = asyncio.Event()
        self._log = get_logger()
        self.http: HealthServer | None = None
        #: The lease of each outbox that runs under one, by index (see `_role`).
        self._leases: dict[int, Lease] = {}
        #: Why outboxes could not be served (a database the relay does not support): `run`
        #: then stops every outbox and exits 2, and the command line prints these lines.
        self.refusals: list[str] = []

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when every outbox this replica is active for can reach its database and broker,
        and, for those it is a standby for, its database (so that it could take over); `role`
        tells which it is."""
        detail: dict[str, object] = {}
        ready = True
        for index, pipeline in enumerate(self.pipelines):
            role = self._role(index)
            entry: dict[str, object] = {"role": role}
            lease = self._leases.get(index)
            if role == "active":
                entry |= {"started": pipeline.started, "database": pipeline.db_ok, "sink": pipeline.sink_ok}
                problem = pipeline.problems.describe()
                # (Reachable is not enough: a setup problem, such as marks the role may not make
                # while its fetches work, stops the outbox all the same.)
                ready = ready and pipeline.ready and not problem
            else:
                database_ok = lease is not None and lease.database_ok
                entry["database"] = database_ok
                problem = lease.problems.describe() if lease is not None else []
                # (A standby with a setup problem could not take over: not ready either.)
                ready = ready and database_ok and not problem
            if problem:
                entry["problems"] = problem
            detail[pipeline.name] = entry
        return ready, {"outboxes": detail}

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive unless a call of an outbox's pipeline has been out for longer than
        `http.stuck_after` (see relay.stalls); then the details name each such outbox, the stage
        of its oldest call and for how long. The first time a call is found stalled, one error
        line says so. Only pipelines this replica runs have calls out: a standby runs none, and
        a pipeline whose term ended has none left once its run returned (its tasks are
        cancelled and awaited), so one still out belongs to a run that cannot end either."""
        threshold = self.config.http.stuck_after
        stuck: dict[str, object] = {}
        for pipeline in self.pipelines:
            stall = pipeline.calls.stalled(threshold)
            if stall is None:
                continue
            stuck[pipeline.name] = {"stage": stall.stage, "seconds": round(stall.seconds, 1)}
            if stall.first:
                self._log.error(
                    "stalled: a call has not returned; /healthz fails until it does",
                    outbox=pipeline.name,
                    stage=stall.stage,
                    seconds=round(stall.seconds, 1),
                    stuck_after=threshold,
                )
        return (False, {"outboxes": stuck}) if stuck else (True, {})

    async def _watch_stalls(self) -> None:
        """Look for stalls every second, so that one is logged whether /healthz is probed or not."""
        while True:
            self.liveness()
            await asyncio.sleep(1.0)  # (a cadence, not a retry)

    @staticmethod
    def _lease_dsn(outbox: OutboxConfig) -> str | None:
        return outbox.source.database() if outbox.lease.enabled else None

    async def _supervise(self, index: int, drain: bool) -> None:
        """Run one outbox: wait for its lease (if any), relay while holding it, and go back to
        standby with a fresh pipeline whenever the lease is lost."""
        outbox = self.config.outboxes[index]
        dsn = self._lease_dsn(outbox)
        if dsn is None:
            await self.pipelines[index].run(self.stop, drain=drain)
            return
        lease = self._leases[index] = _lease_of(outbox, dsn)
        # Every session this outbox opens goes by the holder's name: a new holder ends them all
        # if this process freezes or is cut off (the tasks below inherit it).
        SESSION_NAME.set(lease.session_name)
        # 1 only while the term is valid, read when scraped: not a value left from before a freeze.
        metrics.LEADER.labels(outbox.name).set_function(lambda: 1.0 if lease.held else 0.0)
        log = self._log.bind(outbox=outbox.name)
        first_term = True
        try:
            while not self.stop.is_set():
                term = await lease.acquire(self.stop)
                if term is None:
                    return
                if not first_term:
                    self.pipelines[index] = build_pipeline(outbox, index)
                first_term = False
                log.info("active: this relay holds the lease", token=term.token, holder=lease.holder)
                keeper = asyncio.create_task(self._keep(lease, term, log))
                # The pipeline checks the term before it acts; an idle one (nothing to publish,
                # a stream it cannot reopen) must hear of the loss too, at once.
                lost = asyncio.Event()
                keeper.add_done_callback(partial(_set_when_done, lost))
                try:
                    finished = await self.pipelines[index].run(
                        self.stop, drain=drain, abandon=lost, fence=term
                    )
                finally:
                    keeper.cancel()
                    await asyncio.gather(keeper, return_exceptions=True)
                if finished:
                    return
                log.error("lease lost: abandoned in-flight work, back to standby")
                metrics.forget_active_state(outbox.name)
        finally:
            await lease.release()

    def _role(self, index: int) -> str:
        """active while this process relays the outbox: without a lease, always; with one,
        only while its term is valid (asked now, not remembered: a process that wakes from a
        freeze past its deadline says standby at once)."""
        if not self._lease_dsn(self.config.outboxes[index]):
            return "active"
        lease = self._leases.get(index)
        return "active" if lease is not None and lease.held else "standby"

    @staticmethod
    async def _keep(lease: Lease, term: Term, log: Any) -> None:
        """Renew the term while it lasts; log why it ended (the pipeline sees it end by itself)."""
        try:
            await lease.keep(term)
        except LeaseLost as exc:
            log.error("lease lost", reason=str(exc))

    async def _serve(self, index: int, drain: bool) -> None:
        """`_supervise`, and for a database the relay cannot serve, a refusal that stops all."""
        try:
            await self._supervise(index, drain)
        except Unsupported as exc:
            self.refusals.append(f"outboxes[{index}] ({self.config.outboxes[index].name}): {exc}")
            self.stop.set()

    def _on_signal(self, signum: int) -> None:
        if self.stop.is_set():
            self._log.warning("second signal: exiting now (unacknowledged events will be re-sent)")
            raise SystemExit(1)
        self._log.info("stopping: finishing in-flight events", signal=signal.Signals(signum).name)
        self.stop.set()

    async def run(self, *, drain: bool = False) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        if self.config.http.port:
            self.http = HealthServer(
                self.config.http.host, self.config.http.port, self.readiness, self.liveness
            )
            try:
                await self.http.start()
            except OSError as exc:
                self._log.error("cannot open the HTTP port", port=self.config.http.port, error=str(exc))
                return 2
            self._log.info("http listening", port=self.http.port)
        runs = [asyncio.create_task(self._serve(i, drain)) for i in range(len(self.pipelines))]
        stall_watch = asyncio.create_task(self._watch_stalls())
        try:
            stopper = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait({stopper, *runs}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                _, still = await asyncio.wait(runs, timeout=self.config.shutdown_grace)
                if still:
                    self._log.error("grace period over: exiting with events in flight")
                    for task in still:
                        task.cancel()
                    await asyncio.gather(*still, return_exceptions=True)
                    return 1
                if drain and not done.issuperset(runs):
                    # (A batch job stopped at its deadline did not do its job: say so.)
                    self._log.error("stopped before the outbox was empty: --drain did not finish")
                    return 1
            else:
                await asyncio.gather(*runs)
                stopper.cancel()
            for task in runs:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            return 2 if self.refusals else 0
        finally:
            stall_watch.cancel()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self.http is not None:
                await self.http.close()
