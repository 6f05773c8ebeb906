"""A setup mistake that cannot heal by itself (a missing table, a refused login, a missing
privilege) is unmistakable while the relay runs: one error line naming the cause (not a retry line
per attempt), /readyz 503 naming it, and outbox_relay_setup_problem at 1; once an operator fixes
it, the relay goes on by itself. A real PostgreSQL, the relay as a process."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg import sql

from tests.conftest import StartRelay, run_cli
from tests.support import (
    free_port,
    grant_tables,
    http_get,
    insert_events,
    login_role,
    read_lines,
    relay_config,
    stop_relay,
    unpublished,
    wait_for,
    write_config,
)


def _config(dsn: str, out: Path, port: int, **source: Any) -> dict[str, Any]:
    config = relay_config(dsn, {"type": "file", "path": str(out)}, **source)
    config["http"] = {"host": "127.0.0.1", "port": port}
    config["log"] = {"format": "json"}
    return config


def _readiness(port: int) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(http_get(f"http://127.0.0.1:{port}/readyz"))
    return body


def _problem_gauge(port: int) -> float | None:
    for line in http_get(f"http://127.0.0.1:{port}/metrics").splitlines():
        if line.startswith('outbox_relay_setup_problem{component="database",outbox="orders"}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def _problems(port: int) -> list[dict[str, str]]:
    entry: dict[str, Any] = _readiness(port)["outboxes"]["orders"]
    return list(entry.get("problems", []))


def _log_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for text in log.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


def _wait_for_problem(port: int, kind: str) -> dict[str, str]:
    wait_for(lambda: any(p["problem"] == kind for p in _problems_or_none(port)), 30, f"problem {kind!r}")
    [problem] = _problems(port)
    return problem


def _problems_or_none(port: int) -> list[dict[str, str]]:
    try:
        return _problems(port)
    except (OSError, ValueError):
        return []


def _assert_said_once_not_per_retry(log: Path, kind: str) -> None:
    lines = _log_lines(log)
    said = [line for line in lines if line.get("problem") == kind and line["level"] == "error"]
    assert len(said) == 1, said
    retries = [line for line in lines if "not reachable" in str(line.get("event"))]
    assert retries == [], "a setup mistake is not reported as an outage"


def test_a_missing_table_is_named_in_the_log_readiness_and_a_metric_and_init_db_heals_it(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    port = free_port()
    out = tmp_path / "out.jsonl"
    path = write_config(tmp_path, _config(dsn, out, port, table="app_events"))
    relay = start_relay(path)
    problem = _wait_for_problem(port, "table does not exist")
    assert problem["component"] == "database"
    assert "table app_events does not exist" in problem["error"]
    assert "init-db" in problem["fix"]
    assert _readiness(port)["ready"] is False
    assert _problem_gauge(port) == 1.0
    time.sleep(3)  # several retries: still one line
    _assert_said_once_not_per_retry(tmp_path / "relay-0.log", "table does not exist")

    assert run_cli("init-db", "-c", str(path)).returncode == 0
    insert_events(dsn, 5, table="app_events")
    wait_for(lambda: len(read_lines(out)) == 5 if out.exists() else False, 30, "events after init-db")
    assert _problems(port) == []
    assert _problem_gauge(port) == 0.0
    wait_for(lambda: _readiness(port)["ready"], 10, "ready")
    stop_relay(relay)
    assert any(line["event"] == "setup problem fixed" for line in _log_lines(tmp_path / "relay-0.log"))


def test_a_login_the_database_refuses_is_not_reported_as_unreachable(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    port = free_port()
    role = f"relay_test_{uuid.uuid4().hex[:12]}"
    refused = psycopg.conninfo.make_conninfo(dsn, user=role)
    path = write_config(tmp_path, _config(refused, tmp_path / "out.jsonl", port))
    start_relay(path)
    problem = _wait_for_problem(port, "login refused")
    assert f'role "{role}" does not exist' in problem["error"]
    # A standby that cannot reach its database says so in the metric too, not only in /readyz.
    up = 'outbox_relay_up{component="database",outbox="orders"} 0.0'
    assert up in http_get(f"http://127.0.0.1:{port}/metrics").splitlines()
    assert _readiness(port)["ready"] is False
    assert _problem_gauge(port) == 1.0
    time.sleep(3)
    _assert_said_once_not_per_retry(tmp_path / "relay-0.log", "login refused")


def test_a_missing_privilege_is_named_and_a_grant_heals_it(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    port = free_port()
    out = tmp_path / "out.jsonl"
    with login_role(dsn) as role:
        insert_events(dsn, 3)
        config = _config(psycopg.conninfo.make_conninfo(dsn, user=role), out, port)
        config["outboxes"][0]["dead_letter"] = {"on_poison": "dead_letter"}
        relay = start_relay(write_config(tmp_path, config))
        problem = _wait_for_problem(port, "permission denied")
        assert "permission denied for table" in problem["error"], problem
        assert _problem_gauge(port) == 1.0
        assert _readiness(port)["ready"] is False
        grant_tables(dsn, role)
        wait_for(lambda: len(read_lines(out)) == 3 if out.exists() else False, 30, "events after the grant")
        assert _problems(port) == []
        assert _problem_gauge(port) == 0.0
        stop_relay(relay)


def test_a_role_that_may_read_the_outbox_but_not_mark_it_is_a_lasting_setup_problem(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    """Each fetch works, each mark fails: the fetches must not clear what the marks meet, or
    /readyz says ready, the gauge 0 and the alert never fires while nothing is marked."""
    port = free_port()
    out = tmp_path / "out.jsonl"
    with login_role(dsn) as role:
        insert_events(dsn, 3)
        grant_tables(dsn, role)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("REVOKE UPDATE ON outbox FROM {}").format(sql.Identifier(role)))
        config = _config(psycopg.conninfo.make_conninfo(dsn, user=role), out, port)
        relay = start_relay(write_config(tmp_path, config))
        problem = _wait_for_problem(port, "permission denied")
        time.sleep(3)  # many fetches and marks later
        assert _problems(port) == [problem], "still there: the marks still fail"
        assert _problem_gauge(port) == 1.0
        assert _readiness(port)["ready"] is False
        _assert_said_once_not_per_retry(tmp_path / "relay-0.log", "permission denied")
        said = _log_lines(tmp_path / "relay-0.log")
        fixed = [line for line in said if line.get("event") == "setup problem fixed"]
        assert fixed == [], "a fetch that works fixes nothing"
        grant_tables(dsn, role)
        wait_for(lambda: unpublished(dsn) == 0, 30, "every event marked after the grant")
        assert _problems(port) == []
        stop_relay(relay)


def test_a_publication_that_publishes_another_table_too_is_a_setup_problem_until_it_is_dropped(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    """Its inserts could not become events: said once, not retried as an outage, not ready; the
    outbox goes on by itself once the publication is made right."""
    port = free_port()
    out = tmp_path / "out.jsonl"
    name = f"pub_{uuid.uuid4().hex[:8]}"
    config = _config(dsn, out, port, type="postgres-logical", slot=name, publication=name, mode="table")
    path = write_config(tmp_path, config)
    init = run_cli("init-db", "-c", str(path))
    assert init.returncode == 0, init.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE other (id int PRIMARY KEY)")
        conn.execute(sql.SQL("ALTER PUBLICATION {} ADD TABLE other").format(sql.Identifier(name)))
    try:
        insert_events(dsn, 3)
        relay = start_relay(path)
        problem = _wait_for_problem(port, "publication does not match the tables")
        assert "other" in problem["error"], problem
        assert _problem_gauge(port) == 1.0
        assert _readiness(port)["ready"] is False
        _assert_said_once_not_per_retry(tmp_path / "relay-0.log", "publication does not match the tables")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER PUBLICATION {} DROP TABLE other").format(sql.Identifier(name)))
        wait_for(lambda: len(read_lines(out)) == 3 if out.exists() else False, 30, "the events once fixed")
        assert _problems(port) == []
        stop_relay(relay)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                         " WHERE slot_name = %s AND NOT active", (name,))  # fmt: skip


def test_a_missing_lease_table_is_created_by_the_relay_or_named_when_its_role_may_not(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    port = free_port()
    out = tmp_path / "out.jsonl"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE outbox_relay_leases")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    with login_role(dsn) as role:
        grant_tables(dsn, role)
        insert_events(dsn, 3)
        config = _config(psycopg.conninfo.make_conninfo(dsn, user=role), out, port)
        relay = start_relay(write_config(tmp_path, config))
        problem = _wait_for_problem(port, "permission denied")
        assert "lease table public.outbox_relay_leases does not exist" in problem["error"], problem
        assert "init-db" in problem["error"]
        stop_relay(relay)
        # As a role that may create it, the relay creates it and goes on.
        owner = start_relay(write_config(tmp_path, _config(dsn, out, port), "owner.yaml"))
        wait_for(lambda: len(read_lines(out)) == 3 if out.exists() else False, 30, "events")
        stop_relay(owner)


def test_check_refuses_a_read_only_database_and_run_names_it_as_a_setup_problem(
    dsn: str, tmp_path: Path, start_relay: StartRelay
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        database = conn.info.dbname
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                sql.Identifier(database)
            )
        )
    insert_events_read_write(dsn, 3)
    port = free_port()
    path = write_config(tmp_path, _config(dsn, tmp_path / "out.jsonl", port))
    check = run_cli("check", "-c", str(path), "--connect")
    assert check.returncode == 1
    failed = yaml.safe_load(check.stdout)["outbox orders"]["connect"]["database"]
    assert failed["ok"] is False, failed
    assert failed["error"].startswith("the database session is read-only"), failed
    start_relay(path)
    problem = _wait_for_problem(port, "database is read-only")
    assert "read-only transaction" in problem["error"]
    assert "primary" in problem["fix"]


def test_check_names_a_privilege_the_role_lacks_to_settle_rows(dsn: str, tmp_path: Path) -> None:
    with login_role(dsn) as role:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("GRANT SELECT ON outbox TO {}").format(sql.Identifier(role)))
        config = _config(psycopg.conninfo.make_conninfo(dsn, user=role), tmp_path / "out.jsonl", 0)
        check = run_cli("check", "-c", str(write_config(tmp_path, config)), "--connect")
        assert check.returncode == 1
        expected = f"permission denied: role {role} lacks UPDATE on table public.outbox"
        assert expected in check.stdout, check.stdout


def insert_events_read_write(dsn: str, count: int) -> None:
    """insert_events in a session that may write although the database defaults to read-only."""
    with psycopg.connect(dsn, autocommit=True, options="-c default_transaction_read_only=off") as conn:
        for i in range(count):
            conn.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)"
                " VALUES ('order', %s, 'Created', '{}')",
                (f"order-{i}",),
            )
