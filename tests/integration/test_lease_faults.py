"""Replicas when the active one freezes or is cut off (a real PostgreSQL, relay processes).

Each replica posts to a webhook receiver of its own that takes 5 ms per event, one at a time,
so what each one published, and when, is known, and the active one always has events in
flight when the fault comes (a burst fills its window): the old holder must publish nothing
once a standby could have taken over, mark nothing after it wakes, and the two must never both
say "active". The consumer's view is every request of both receivers in the order they
arrived. The lease lasts 2 s here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay.tools.drill_proxy import CutoffProxy
from tests.conftest import webhook_request_as_lines
from tests.harness.webhook import Reply, WebhookReceiver
from tests.support import (
    assert_complete_and_ordered,
    event_ids,
    free_port,
    grant_tables,
    login_role,
    relay_config,
    start_relay,
    wait_for,
    write_config,
)
from tests.writers import SteadyWriter

pytestmark = pytest.mark.slow

LEASE_TIME = 2.0
LEASE = {"time": f"{LEASE_TIME:g}s", "check_interval": "500ms"}
#: What a takeover may take beyond the lease time on a busy machine (the standby's next look,
#: scheduling): a bound on liveness, not a speed figure.
SLACK = 1.5


class Replica:
    """One relay process with its own HTTP port and its own webhook receiver."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        dsn: str,
        source: str,
        lease: dict[str, str] | None = None,
        **settings: Any,
    ) -> None:
        self.name = name
        self.receiver = WebhookReceiver()
        self.receiver.respond_with(lambda _: Reply(delay=0.005))
        self.port = free_port()
        sink = {"type": "webhook", "url": self.receiver.url, "max_concurrency": 1}
        if source == "logical":
            config = relay_config(dsn, sink, type="postgres-logical", mode="table", **settings)
        else:
            config = relay_config(dsn, sink, **settings)
        config["outboxes"][0]["lease"] = {**LEASE, **(lease or {})}
        config["outboxes"][0]["pipeline"] = {"publish_batch_size": 20, "max_in_flight": 400}
        config["http"] = {"port": self.port, "host": "127.0.0.1"}
        path = write_config(tmp_path, config, f"{name}.yaml")
        self.proc = start_relay(path, log=tmp_path / f"{name}.log")

    def role(self) -> str | None:
        """Its role as /readyz says it; None when it does not answer within 0.3 s (frozen)."""
        readiness = self.readiness()
        return str(readiness["role"]) if readiness else None

    def readiness(self) -> dict[str, Any]:
        """What /readyz says of the outbox; {} when it does not answer within 0.3 s (frozen)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=0.3) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
        except OSError:
            return {}
        try:
            return dict(json.loads(body)["outboxes"]["orders"])
        except (ValueError, KeyError):
            return {}

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def size(self) -> int:
        """How many requests it made."""
        return len(self.receiver.received())

    def received_since(self, since: float) -> list[tuple[float, dict[str, Any]]]:
        return [(at, line) for at, line in self.arrivals() if at >= since]

    def arrivals(self) -> list[tuple[float, dict[str, Any]]]:
        """(when it arrived, the event) for every event it published."""
        return [
            (request.received_at, line)
            for request in self.receiver.received()
            for line in webhook_request_as_lines(request)
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.receiver.close()


class RoleWatch(threading.Thread):
    """Asks both replicas for their role every 50 ms; counts the rounds in which both said
    active."""

    def __init__(self, first: Replica, second: Replica) -> None:
        super().__init__(daemon=True)
        self.replicas = (first, second)
        self.stop = threading.Event()
        self.both_active = 0
        self.rounds = 0

    def run(self) -> None:
        while not self.stop.is_set():
            roles = [replica.role() for replica in self.replicas]
            self.rounds += 1
            if roles == ["active", "active"]:
                self.both_active += 1
            time.sleep(0.05)


def _burst(dsn: str, count: int = 600) -> None:
    """Events enough to fill the active replica's window, so it has work in flight (in one
    transaction, on aggregates of their own: the writer's are written one at a time)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
            " SELECT 'order', 'burst-' || (i %% 15), 'OrderUpdated', jsonb_build_object('seq', i)"
            " FROM generate_series(1, %s) AS i",
            (count,),
        )


def _prepare(dsn: str, source: str) -> None:
    """The logical source's slot and publication; an audit of who marks rows, and when."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        if source == "logical":
            conn.execute("CREATE PUBLICATION outbox_relay FOR TABLE outbox")
            conn.execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')")
        conn.execute(
            "CREATE TABLE mark_audit"
            " (position bigint, session text, at timestamptz DEFAULT clock_timestamp())"
        )
        conn.execute(
            "CREATE FUNCTION audit_mark() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " INSERT INTO mark_audit (position, session)"
            " VALUES (NEW.position, current_setting('application_name'));"
            " RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER audit_mark AFTER UPDATE OF published_at ON outbox FOR EACH ROW"
            " WHEN (NEW.published_at IS NOT NULL) EXECUTE FUNCTION audit_mark()"
        )


def _holder(dsn: str) -> tuple[str, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT holder, token FROM outbox_relay_leases").fetchone()
    assert row is not None
    return str(row[0]), int(row[1])


def _session_of(holder: str) -> str:
    return "outbox-relay " + holder.rsplit(" ", 1)[-1]


def _server_now(dsn: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]


def _marks_by(dsn: str, session: str, since: Any) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM mark_audit WHERE session = %s AND at >= %s", (session, since)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _streaming_session(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_replication_slots s"
            " JOIN pg_stat_activity a ON a.pid = s.active_pid"
            " WHERE s.slot_name = 'outbox_relay'"
        ).fetchone()
    return None if row is None else str(row[0])


def _through(proxy: CutoffProxy, dsn: str) -> str:
    return make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port))


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Replica]]:
    replicas: list[Replica] = []
    try:
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def _first_active_then_standby(
    tmp_path: Path, dsn: str, source: str, started: list[Replica], old_dsn: str | None = None
) -> tuple[Replica, Replica]:
    old = Replica(tmp_path, "old", old_dsn or dsn, source)
    started.append(old)
    wait_for(lambda: old.role() == "active", 30, "the first replica to take the lease")
    new = Replica(tmp_path, "new", dsn, source)
    started.append(new)
    wait_for(lambda: new.role() == "standby", 30, "the second replica to stand by")
    return old, new


def _only_writes_cut_short_by_the_freeze(
    after_waking: list[tuple[float, dict[str, Any]]], new: Replica, woken: float
) -> None:
    """What the old holder sent on waking can only be a request it was writing when it froze
    (after its last check: no process can check anything between its check and its write):
    at most one per concurrent sink call, at once, and each one an event the new holder
    delivers too (the old one never marked it), so a consumer that drops repeats sees every
    aggregate in order (checked on the merged arrivals)."""
    assert len(after_waking) <= 2, f"the old holder sent {len(after_waking)} events after waking"
    delivered_by_new = {line["event_id"] for _, line in new.arrivals()}
    for at, line in after_waking:
        assert at - woken < 0.5, "the old holder started a new send after waking"
        assert line["event_id"] in delivered_by_new, "the old holder sent an event it had marked"


def _delivered_complete_and_in_order(dsn: str, old: Replica, new: Replica) -> tuple[int, float]:
    """Every event delivered, in order per aggregate as a consumer of both receivers saw them;
    returns the duplicates and how long after the old holder's last request the new one's
    first came (negative: they overlapped)."""
    expected = event_ids(dsn)

    def all_there() -> bool:
        return expected <= {line["event_id"] for _, line in old.arrivals() + new.arrivals()}

    wait_for(all_there, 90, "every event delivered")
    old_arrivals, new_arrivals = old.arrivals(), new.arrivals()
    gap = min(at for at, _ in new_arrivals) - max(at for at, _ in old_arrivals)
    merged = [line for _, line in sorted(old_arrivals + new_arrivals, key=lambda arrival: arrival[0])]
    return assert_complete_and_ordered(merged, expected), gap


@pytest.mark.parametrize("source", ["polling", "logical"])
def test_a_frozen_active_replica_is_replaced_within_the_lease_time_and_publishes_and_marks_nothing_on_waking(
    tmp_path: Path, dsn: str, source: str, started: list[Replica]
) -> None:
    _prepare(dsn, source)
    old, new = _first_active_then_standby(tmp_path, dsn, source, started)
    writer = SteadyWriter(dsn, rate=150, aggregates=15)
    writer.start()
    watch = RoleWatch(old, new)
    try:
        wait_for(lambda: old.size() > 0, 20, "the first replica to publish")
        holder, token = _holder(dsn)
        _burst(dsn)
        wait_for(lambda: old.size() > 50, 20, "the first replica to publish the burst")
        os.kill(old.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        watch.start()
        wait_for(lambda: new.role() == "active", LEASE_TIME * 4, "the standby to take over", interval=0.02)
        takeover = time.monotonic() - frozen_at
        assert _holder(dsn)[1] > token
        time.sleep(LEASE_TIME)
        woken_at = _server_now(dsn)
        os.kill(old.proc.pid, signal.SIGCONT)
        woken = time.monotonic()
        time.sleep(2.0)
        assert old.role() == "standby"
        # (A standby exports no backlog: its last one would stay, and alerts fire on it.)
        assert 'outbox_relay_in_flight_events{outbox="orders"}' not in old.metrics()
        assert 'outbox_relay_in_flight_events{outbox="orders"}' in new.metrics()
        after_waking = old.received_since(woken)
        assert _marks_by(dsn, _session_of(holder), woken_at) == 0, "the old holder marked rows after waking"
        if source == "logical":
            assert _streaming_session(dsn) == _session_of(_holder(dsn)[0])
    finally:
        writer.stop.set()
        writer.join()
        watch.stop.set()
    print(f"{source}: takeover {takeover:.2f}s after freezing the active replica (lease {LEASE_TIME:g}s)")
    assert takeover < LEASE_TIME + SLACK
    assert watch.both_active == 0, (
        f"both replicas said active in {watch.both_active} of {watch.rounds} rounds"
    )
    duplicates, _ = _delivered_complete_and_in_order(dsn, old, new)
    print(f"{source}: {duplicates} duplicates; {len(after_waking)} sent by the old holder on waking")
    _only_writes_cut_short_by_the_freeze(after_waking, new, woken)


# (A cut that closes the connections is a fault of the drill's tests too: tests/integration/test_drill.py.)
@pytest.mark.parametrize(("source", "fault"), [("polling", "hold"), ("logical", "hold")])
def test_an_active_replica_cut_off_from_the_database_is_replaced_within_the_lease_time_and_stops_first(
    tmp_path: Path, dsn: str, source: str, fault: str, started: list[Replica]
) -> None:
    """`hold`: a proxy keeps both ends of every connection open and forwards nothing; `cut`: it
    closes them and refuses new ones. The replica behind it stops publishing at its deadline,
    before the standby takes over, says standby from then on, and goes on standing by once
    the network is back."""
    _prepare(dsn, source)
    params = conninfo_to_dict(dsn)
    with CutoffProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)) as proxy:
        old, new = _first_active_then_standby(tmp_path, dsn, source, started, old_dsn=_through(proxy, dsn))
        writer = SteadyWriter(dsn, rate=150, aggregates=15)
        writer.start()
        watch = RoleWatch(old, new)
        watch.start()
        try:
            wait_for(lambda: old.size() > 0, 20, "the first replica to publish")
            holder, _ = _holder(dsn)
            _burst(dsn)
            wait_for(lambda: old.size() > 50, 20, "the first replica to publish the burst")
            getattr(proxy, fault)()
            cut_at = time.monotonic()
            wait_for(
                lambda: new.role() == "active", LEASE_TIME * 4, "the standby to take over", interval=0.02
            )
            takeover = time.monotonic() - cut_at
            assert old.role() == "standby"
            time.sleep(LEASE_TIME)
            proxy.forward()
            back_at = _server_now(dsn)
            time.sleep(2.0)
            assert old.role() == "standby"
            assert new.role() == "active"
            assert _marks_by(dsn, _session_of(holder), back_at) == 0
        finally:
            writer.stop.set()
            writer.join()
            watch.stop.set()
        duplicates, gap = _delivered_complete_and_in_order(dsn, old, new)
        print(
            f"{source}/{fault}: takeover {takeover:.2f}s after the cut; the new holder's first request"
            f" {gap:.2f}s after the old's last; {duplicates} duplicates"
        )
        assert takeover < LEASE_TIME + SLACK
        # The old one stopped at its deadline, a margin before the lease ended on the server.
        assert gap > 0
        assert watch.both_active == 0, (
            f"both replicas said active in {watch.both_active} of {watch.rounds} rounds"
        )


def test_replicas_whose_search_path_or_spelling_of_the_table_differ_share_one_lease(
    tmp_path: Path, dsn: str, started: list[Replica]
) -> None:
    """One finds the outbox as `outbox` through a search_path that starts with an empty schema
    of its own, the other names it `public.outbox`: one lease (in the outbox table's schema),
    one active."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA elsewhere")
        conn.execute("DROP TABLE outbox_relay_leases")
    elsewhere = make_conninfo(dsn, options="-c search_path=elsewhere,public")
    first = Replica(tmp_path, "first", elsewhere, "polling")
    started.append(first)
    wait_for(lambda: first.role() == "active", 30, "the first replica to take the lease")
    second = Replica(tmp_path, "second", dsn, "polling", table="public.outbox")
    started.append(second)
    watch = RoleWatch(first, second)
    watch.start()
    try:
        wait_for(lambda: second.role() == "standby", 30, "the second replica to stand by")
        time.sleep(LEASE_TIME * 2)
    finally:
        watch.stop.set()
    assert watch.both_active == 0, f"both said active in {watch.both_active} of {watch.rounds} rounds"
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.relname = 'outbox_relay_leases'"
        ).fetchall()
        leases = conn.execute("SELECT count(*) FROM public.outbox_relay_leases").fetchone()
    assert tables == [("public",)]
    assert leases == (1,)


@pytest.mark.parametrize("readable", [True, False], ids=["readable", "unreadable"])
def test_a_replica_configured_with_another_lease_table_stands_by_and_says_why(
    tmp_path: Path, dsn: str, started: list[Replica], readable: bool
) -> None:
    """Two lease tables for one outbox would make two holders: the second replica takes a row
    of its own but not the outbox's guard, gives its row up and reports a setup problem, also
    when its role may not read the first one's lease table (in a schema it may not use)."""
    with contextlib.ExitStack() as roles:
        second_dsn = dsn
        if not readable:
            role = roles.enter_context(login_role(dsn))
            grant_tables(dsn, role)
            second_dsn = make_conninfo(dsn, user=role)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA private")
        first = Replica(tmp_path, "first", dsn, "polling", lease={"table": "private.leases"})
        started.append(first)
        wait_for(lambda: first.role() == "active", 30, "the first replica to take the lease")
        second = Replica(tmp_path, "second", second_dsn, "polling")
        started.append(second)
        watch = RoleWatch(first, second)
        watch.start()
        try:
            wait_for(lambda: "problems" in second.readiness(), 30, "the second replica to name the problem")
            time.sleep(LEASE_TIME)
        finally:
            watch.stop.set()
        [problem] = second.readiness()["problems"]
        assert problem["problem"] == "replicas use different lease tables", problem
        assert first.role() == "active"
        assert second.role() == "standby"
        # The holder's guard session ends (the second could take the guard now): it stands by all
        # the same, having seen the lease held through another table, and the first takes the
        # guard again with its next renewal.
        watch = RoleWatch(first, second)
        watch.start()
        try:
            for _ in range(3):
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_locks"
                        " WHERE locktype = 'advisory' AND granted"
                    )
                time.sleep(1.0)
        finally:
            watch.stop.set()
        assert first.role() == "active"
        assert second.role() == "standby"
        assert watch.both_active == 0, f"both said active in {watch.both_active} of {watch.rounds} rounds"
        for replica in started:  # (before their role goes)
            replica.stop()


@pytest.mark.parametrize("how", ["DELETE FROM outbox_relay_leases", "TRUNCATE outbox_relay_leases"])
def test_a_lease_row_deleted_by_hand_is_made_again_and_a_standby_still_takes_over_a_sigkill(
    tmp_path: Path, dsn: str, started: list[Replica], how: str
) -> None:
    """The row made again names no holder, so a standby may take it while the holder, which
    has not yet found out, still keeps the outbox's guard: that holder is not a rival with
    another lease table, and the standby must not stand by for good (then nobody would take
    over when the holder dies). Renewals every 2 s, looks more often: the standby wins that
    race."""
    lease = {"time": "6s", "check_interval": "2s"}
    first = Replica(tmp_path, "first", dsn, "polling", lease=lease)
    started.append(first)
    wait_for(lambda: first.role() == "active", 30, "the first replica to take the lease")
    second = Replica(tmp_path, "second", dsn, "polling", lease=lease)
    started.append(second)
    wait_for(lambda: second.role() == "standby", 30, "the second replica to stand by")
    for _ in range(2):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(how)
        wait_for(lambda: "active" in (first.role(), second.role()), 6 * 3, "a replica active again")
        time.sleep(6 * 2)  # (what follows the delete has settled)
        for replica in (first, second):
            assert "problems" not in replica.readiness(), replica.readiness()
    _burst(dsn, 30)
    wait_for(lambda: first.size() + second.size() >= 30, 30, "the events after the delete")
    active, standby = (first, second) if first.role() == "active" else (second, first)
    assert standby.role() == "standby"
    active.proc.kill()
    active.proc.wait(timeout=10)
    killed_at = time.monotonic()
    wait_for(lambda: standby.role() == "active", 6 + 2 * SLACK, "the standby to take over", interval=0.05)
    print(f"{how}: takeover {time.monotonic() - killed_at:.2f}s after the SIGKILL")


@pytest.mark.parametrize("second_ends", ["sigterm", "sigkill-at-once"])
def test_a_chain_of_takeovers_from_a_frozen_holder_goes_on_when_no_role_may_end_another(
    tmp_path: Path, dsn: str, started: list[Replica], second_ends: str
) -> None:
    """Three replicas, each with a role of its own that may not end the others' sessions: the
    first freezes with the guard; the second takes over without it; when the second stops (or
    is killed the moment the row names it), the third takes over too (the frozen holder's guard
    session is stale, noted in the row by the statement that took it), with no 'different lease
    tables' problem, and no two say active at once."""
    with contextlib.ExitStack() as roles:
        names = [roles.enter_context(login_role(dsn)) for _ in range(3)]
        for role in names:
            grant_tables(dsn, role)
        dsns = [make_conninfo(dsn, user=role) for role in names]
        frozen = Replica(tmp_path, "r0", dsns[0], "polling")
        started.append(frozen)
        wait_for(lambda: frozen.role() == "active", 30, "the first replica to take the lease")
        replicas = [frozen] + [Replica(tmp_path, f"r{i}", dsns[i], "polling") for i in (1, 2)]
        started.extend(replicas[1:])
        wait_for(lambda: all(r.role() == "standby" for r in replicas[1:]), 30, "the others to stand by")
        holder, _ = _holder(dsn)
        os.kill(frozen.proc.pid, signal.SIGSTOP)
        if second_ends == "sigkill-at-once":
            wait_for(lambda: _holder(dsn)[0] != holder, LEASE_TIME * 4, "a takeover", interval=0.002)
            [second] = [r for r in replicas[1:] if f" pid {r.proc.pid} " in _holder(dsn)[0]]
            second.proc.kill()
        else:
            wait_for(lambda: any(r.role() == "active" for r in replicas[1:]), LEASE_TIME * 4, "a takeover")
            [second] = [r for r in replicas[1:] if r.role() == "active"]
        [third] = [r for r in replicas[1:] if r is not second]
        watch = RoleWatch(second, third)
        watch.start()
        try:
            if second_ends == "sigterm":
                second.proc.send_signal(signal.SIGTERM)
                assert second.proc.wait(timeout=30) == 0
            wait_for(lambda: third.role() == "active", LEASE_TIME * 4, "the third replica to take over")
            _burst(dsn, 30)
            wait_for(lambda: third.size() >= 30, 30, "the third replica to publish")
            assert "problems" not in third.readiness()
        finally:
            watch.stop.set()
            os.kill(frozen.proc.pid, signal.SIGCONT)
        wait_for(lambda: frozen.role() == "standby", 30, "the woken one to stand by")
        assert watch.both_active == 0
        for replica in replicas:
            replica.stop()


def test_a_standby_back_from_a_long_cut_is_ready_to_take_over_within_the_lease_time(
    tmp_path: Path, dsn: str, started: list[Replica]
) -> None:
    """A standby whose connections were refused for several lease times grew its reconnect
    backoff; once the network is back, a freeze of the active one must still be taken over
    within the lease time (the drill's cut-then-freeze sequence)."""
    _prepare(dsn, "polling")
    params = conninfo_to_dict(dsn)
    with CutoffProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)) as proxy:
        active = Replica(tmp_path, "active", dsn, "polling")
        started.append(active)
        wait_for(lambda: active.role() == "active", 30, "the first replica to take the lease")
        standby = Replica(tmp_path, "standby", _through(proxy, dsn), "polling")
        started.append(standby)
        wait_for(lambda: standby.role() == "standby", 30, "the second replica to stand by")
        proxy.cut()
        time.sleep(LEASE_TIME * 4)
        proxy.forward()
        os.kill(active.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_for(
            lambda: standby.role() == "active", LEASE_TIME * 6, "the standby to take over", interval=0.02
        )
        takeover = time.monotonic() - frozen_at
    print(f"takeover {takeover:.2f}s after freezing the active replica, the standby back from a cut")
    assert takeover < LEASE_TIME + SLACK


#: Over the holder's bound on a lease statement (a fifth of the lease time), under the lease time.
SLOW = LEASE_TIME * 0.45


def _slow_lease_statements_of(dsn: str, session: str, seconds: float) -> None:
    """Every statement of `session` that updates the lease row takes `seconds` on the server: it
    still runs and commits, but its answer comes after the holder gave up waiting (a network
    that delivers requests and loses or delays answers, a database slow for one client)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION slow_lease() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" IF current_setting('application_name') = '{session}' THEN PERFORM pg_sleep({seconds});"
            " END IF; RETURN NULL; END $$"
        )
        # (For each statement, before it locks the row: the others' statements are not held up.)
        conn.execute(
            "CREATE TRIGGER slow_lease BEFORE UPDATE ON outbox_relay_leases"
            " FOR EACH STATEMENT EXECUTE FUNCTION slow_lease()"
        )


def _lease_statements_fast_again(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TRIGGER slow_lease ON outbox_relay_leases")


def test_a_holder_whose_lease_statements_commit_but_answer_too_late_is_replaced_and_cannot_take_it_back(
    tmp_path: Path, dsn: str, started: list[Replica]
) -> None:
    """The holder gives up on a renewal that has not answered within its bound, but the server
    still runs it: a renewal (or a take) abandoned that way must not keep the lease alive. It
    may move the expiry on once, no more: the standby takes over within about a lease time and
    a check interval, and the old holder, which never learns what its statements did, must not
    take the lease back for itself while its statements still go unanswered."""
    _prepare(dsn, "polling")
    old, new = _first_active_then_standby(tmp_path, dsn, "polling", started)
    writer = SteadyWriter(dsn, rate=100, aggregates=10)
    writer.start()
    try:
        wait_for(lambda: old.size() > 0, 20, "the first replica to publish")
        holder, token = _holder(dsn)
        # Every lease statement of the old holder commits, then answers too late.
        _slow_lease_statements_of(dsn, _session_of(holder), SLOW)
        slow_at = time.monotonic()
        wait_for(lambda: new.role() == "active", LEASE_TIME * 4, "the standby to take over", interval=0.02)
        takeover = time.monotonic() - slow_at
        holders = set()
        for _ in range(int(LEASE_TIME * 4 / 0.1)):  # four lease times, statements still slow
            holders.add(_holder(dsn)[0])
            time.sleep(0.1)
        assert holders == {_holder(dsn)[0]} != {holder}, f"the lease went back and forth: {holders}"
        assert new.role() == "active"
        assert old.role() == "standby"
        _lease_statements_fast_again(dsn)
        time.sleep(LEASE_TIME)
        assert new.role() == "active"
        assert old.role() == "standby"
    finally:
        writer.stop.set()
        writer.join()
    print(f"takeover {takeover:.2f}s after the holder's lease statements began to answer too late")
    # The renewal the holder abandoned may have moved the expiry on once, when the server ran
    # it: up to a check interval and the statement's time more.
    assert takeover < LEASE_TIME + 0.5 + SLOW + SLACK
    assert _holder(dsn)[1] > token
    _delivered_complete_and_in_order(dsn, old, new)
