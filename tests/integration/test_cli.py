"""The command line as an operator uses it: real subprocesses against a real PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from tests.conftest import run_cli
from tests.harness.postgres import PostgresServer
from tests.support import (
    assert_complete_and_ordered,
    event_ids,
    free_port,
    http_get,
    insert_events,
    marked_ids,
    read_lines,
    relay_config,
    start_relay,
    stop_relay,
    unpublished,
    wait_for,
    write_config,
)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "outboxes:\n  - name: o\n    source: {type: postgres-polling, dsn: x, batch_size: 0}\n"
            "    sink: {type: stdout}\n",
            "relay.yaml: outboxes[0].source.batch_size: must be >= 1",
        ),
        (
            "outboxes:\n  - name: o\n    source: {type: postgres-polling, dsn: '${NOPE_NOT_SET}'}\n"
            "    sink: {type: stdout}\n",
            "relay.yaml: outboxes[0].source.dsn: environment variable NOPE_NOT_SET is not set",
        ),
        (
            "outboxes:\n  - name: o\n    source: {type: postgres-polling, dsn: x}\n"
            "    sink: {type: carrier-pigeon}\n",
            "relay.yaml: outboxes[0].sink: unknown type 'carrier-pigeon'",
        ),
        (
            "outboxes:\n  - name: o\n    source: {type: postgres-polling, dsn: x, poll_intervall: 1s}\n"
            "    sink: {type: stdout}\n",
            "relay.yaml: outboxes[0].source.poll_intervall: unknown key",
        ),
    ],
)
def test_bad_config_is_refused_with_file_key_and_reason_and_exit_2(
    tmp_path: Path, cli_env: dict[str, str], yaml_text: str, expected: str
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml_text)
    for command in ("run", "check"):
        result = run_cli(command, "-c", str(path), env=cli_env)
        assert result.returncode == 2
        assert result.stderr.startswith(str(tmp_path / expected.split(":", 1)[0]))
        assert expected.split(": ", 1)[1] in result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_unreadable_config_file_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("run", "-c", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"{tmp_path / 'missing.yaml'}: cannot read the file: No such file or directory"
    )


def test_password_never_appears_in_logs_errors_or_check_output(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    secret = "hunter2-Very-Secret"
    dead_dsn = f"postgresql://app:{secret}@127.0.0.1:1/nowhere?connect_timeout=1"
    path = write_config(tmp_path, relay_config(dead_dsn, {"type": "stdout"}))
    check = run_cli("check", "-c", str(path), "--connect", env=cli_env)
    assert check.returncode == 1
    assert yaml.safe_load(check.stdout)["outbox orders"]["connect"]["database"]["ok"] is False
    log = tmp_path / "relay.log"
    relay = start_relay(path, log=log)
    # Several reconnect attempts logged (waiting for them, not a fixed time: a loaded machine
    # may take seconds just to start the process).
    wait_for(lambda: log.read_text().count("database not reachable") >= 3, 60, "reconnect attempts")
    relay.send_signal(signal.SIGTERM)
    relay.wait(timeout=20)
    assert relay.returncode == 0
    for text in (check.stdout, check.stderr, log.read_text()):
        assert secret not in text
    assert "app:***@" in check.stdout


def _connect(check_stdout: str, probe: str) -> dict[str, Any]:
    """One probe of `check --connect`'s YAML: {ok: true, notes: [...]} or {ok: false, error}."""
    found: dict[str, Any] = yaml.safe_load(check_stdout)["outbox orders"]["connect"][probe]
    return found


def test_check_connect_fails_naming_the_dead_letter_database_when_it_is_down_never_showing_its_password(
    dsn: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    secret = f"dl-{uuid.uuid4().hex}"
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {
        "dsn": f"postgresql://app:{secret}@127.0.0.1:1/dl?connect_timeout=1"
    }
    check = run_cli("check", "-c", str(write_config(tmp_path, config)), "--connect", env=cli_env)
    assert check.returncode == 1, check.stdout + check.stderr
    assert _connect(check.stdout, "dead letters")["ok"] is False
    assert _connect(check.stdout, "database")["ok"] is True
    assert secret not in check.stdout + check.stderr


def test_a_dead_letter_database_that_is_down_is_retried_as_an_outage_without_pointing_at_init_db(
    dsn: str, tmp_path: Path
) -> None:
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"dsn": "postgresql://app@127.0.0.1:1/dl?connect_timeout=1"}
    log = tmp_path / "relay.log"
    relay = start_relay(write_config(tmp_path, config), log=log)
    try:
        wait_for(lambda: log.read_text().count("cannot read held events") >= 2, 60, "retries")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=20)
    assert "init-db" not in log.read_text(), "an outage is not a setup mistake"


def test_check_connect_names_a_missing_dead_letter_table_and_a_missing_privilege_on_it(
    pg: PostgresServer, dsn: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    elsewhere = pg.create_database()
    role = f"relay_test_{uuid.uuid4().hex[:12]}"
    try:
        config = relay_config(dsn, {"type": "stdout"})
        config["outboxes"][0]["dead_letter"] = {"dsn": elsewhere}
        path = write_config(tmp_path, config)
        check = run_cli("check", "-c", str(path), "--connect", env=cli_env)
        assert check.returncode == 1, check.stdout + check.stderr
        probe = _connect(check.stdout, "dead letters")
        assert probe["ok"] is False
        assert "outbox_relay_dead_letters does not exist" in probe["error"]
        assert "init-db" in probe["error"]

        assert run_cli("init-db", "-c", str(path), env=cli_env).returncode == 0
        check = run_cli("check", "-c", str(path), "--connect", env=cli_env)
        assert check.returncode == 0, check.stdout + check.stderr
        assert _connect(check.stdout, "dead letters")["ok"] is True

        with psycopg.connect(elsewhere, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT, UPDATE ON outbox_relay_dead_letters TO {}").format(
                    sql.Identifier(role)
                )
            )
        config["outboxes"][0]["dead_letter"] = {"dsn": psycopg.conninfo.make_conninfo(elsewhere, user=role)}
        check = run_cli("check", "-c", str(write_config(tmp_path, config)), "--connect", env=cli_env)
        assert check.returncode == 1, check.stdout + check.stderr
        probe = _connect(check.stdout, "dead letters")
        assert probe["ok"] is False, probe
        assert "may not DELETE" in probe["error"], probe
        assert "GRANT" in probe["error"], probe
    finally:
        with psycopg.connect(elsewhere, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            if exists:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        pg.drop_database(elsewhere)


def test_init_db_is_idempotent_and_can_print_its_sql(pg: PostgresServer, tmp_path: Path) -> None:
    database = pg.create_database()
    try:
        path = write_config(tmp_path, relay_config(database, {"type": "stdout"}))
        printed = run_cli("init-db", "-c", str(path), "--print-sql")
        assert printed.returncode == 0
        assert "CREATE TABLE IF NOT EXISTS" in printed.stdout
        assert "CREATE TRIGGER" in printed.stdout
        for _ in range(2):
            result = run_cli("init-db", "-c", str(path))
            assert result.returncode == 0, result.stderr
        check = run_cli("check", "-c", str(path), "--connect")
        assert check.returncode == 0, check.stdout + check.stderr
        assert "NOTIFY trigger present" in check.stdout
    finally:
        pg.drop_database(database)


def test_status_reports_pending_events_and_age_of_the_oldest(dsn: str, tmp_path: Path) -> None:
    insert_events(dsn, 42)
    path = write_config(tmp_path, relay_config(dsn, {"type": "stdout"}))
    result = run_cli("status", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("orders: pending=42 oldest_age=")
    assert "published_last_minute=0" in result.stdout
    assert "orders: lease: never held" in result.stdout


@pytest.mark.parametrize("source", ["postgres-polling", "postgres-logical"])
def test_status_and_dlq_before_init_db_say_so_in_one_line_each_and_exit_1(
    pg: PostgresServer, tmp_path: Path, source: str
) -> None:
    database = pg.create_database()  # empty: init-db never ran
    try:
        path = write_config(tmp_path, relay_config(database, {"type": "stdout"}, type=source))
        for command in (["status"], ["dlq", "list"]):
            result = run_cli(*command, "-c", str(path))
            assert result.returncode == 1, result.stdout + result.stderr
            said = result.stdout + result.stderr
            assert "LINE 1" not in said, "the server's excerpt of the statement is not for the user"
            assert "init-db" in said, said
    finally:
        pg.drop_database(database)


def _body_or_nothing(url: str) -> str:
    """The body of a GET, or "" while nothing listens there yet."""
    try:
        return http_get(url)
    except OSError:
        return ""


def test_status_names_the_lease_holder_while_a_relay_runs_and_the_lease_free_after_it_stopped(
    dsn: str, tmp_path: Path
) -> None:
    config = relay_config(dsn, {"type": "stdout"})
    config["http"] = {"port": (port := free_port()), "host": "127.0.0.1"}
    path = write_config(tmp_path, config)
    relay = start_relay(path)
    try:
        wait_for(
            lambda: '"role": "active"' in _body_or_nothing(f"http://127.0.0.1:{port}/readyz"), 30, "active"
        )
        held = run_cli("status", "-c", str(path)).stdout
        assert f"lease: held by {socket.gethostname()} pid {relay.pid} " in held, held
        assert re.search(r"\(token \d+\), \d+\.\ds left unless renewed", held), held
    finally:
        stop_relay(relay)
    freed = run_cli("status", "-c", str(path)).stdout
    assert f"lease: free (last held by {socket.gethostname()} pid {relay.pid} " in freed, freed


def test_run_drain_exits_0_once_the_outbox_is_empty(dsn: str, tmp_path: Path) -> None:
    insert_events(dsn, 2000, aggregates=20)
    out = tmp_path / "out.jsonl"
    path = write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(out)}))
    result = run_cli("run", "-c", str(path), "--drain")
    assert result.returncode == 0, result.stderr
    assert assert_complete_and_ordered(read_lines(out), event_ids(dsn)) == 0
    assert unpublished(dsn) == 0


def test_http_serves_metrics_health_and_readiness(dsn: str, tmp_path: Path) -> None:
    insert_events(dsn, 300, aggregates=3)
    config = relay_config(dsn, {"type": "file", "path": str(tmp_path / "out.jsonl")})
    port = free_port()
    config["http"] = {"port": port, "host": "127.0.0.1"}
    config["outboxes"][0]["pipeline"] = {"stats_interval": "100ms"}
    relay = start_relay(write_config(tmp_path, config), capture=True)
    try:
        wait_for(lambda: unpublished(dsn) == 0, 30, "the backlog to drain")
        base = f"http://127.0.0.1:{port}"
        assert json.loads(http_get(base + "/healthz")) == {"status": "alive"}
        ready = json.loads(http_get(base + "/readyz"))
        assert ready["ready"] is True
        assert ready["outboxes"]["orders"] == {
            "role": "active",
            "started": True,
            "database": True,
            "sink": True,
        }
        assert 'outbox_relay_leader{outbox="orders"} 1.0' in http_get(base + "/metrics")
        time.sleep(0.3)  # one stats interval, so pending is measured after the drain
        metrics = http_get(base + "/metrics")
        assert 'outbox_relay_events_published_total{outbox="orders",sink="file"} 300.0' in metrics
        assert 'outbox_relay_pending_events{outbox="orders"} 0.0' in metrics
        assert 'outbox_relay_lag_seconds{outbox="orders"} 0.0' in metrics
        assert 'outbox_relay_end_to_end_seconds_count{outbox="orders"} 300.0' in metrics
        assert 'outbox_relay_batch_seconds_count{outbox="orders",stage="ack"}' in metrics
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.communicate(timeout=20)
    assert relay.returncode == 0


def test_readiness_is_false_while_the_database_is_down(
    controlled_pg: PostgresServer, controlled_dsn: str, tmp_path: Path
) -> None:
    pg, dsn = controlled_pg, controlled_dsn
    config = relay_config(dsn, {"type": "stdout"})
    port = free_port()
    config["http"] = {"port": port, "host": "127.0.0.1"}
    config["outboxes"][0]["pipeline"] = {"stats_interval": "100ms"}
    relay = start_relay(write_config(tmp_path, config), capture=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base) is True, 20, "readiness")
        pg.stop()
        try:
            wait_for(lambda: _ready(base) is False, 20, "readiness to turn false")
        finally:
            pg.start()
        wait_for(lambda: _ready(base) is True, 30, "readiness after the database returned")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.communicate(timeout=20)
    assert relay.returncode == 0


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_publishes_every_event_in_order_per_aggregate(
    dsn: str, tmp_path: Path
) -> None:
    insert_events(dsn, 30_000, aggregates=200)
    out = tmp_path / "out.jsonl"
    config = relay_config(dsn, {"type": "file", "path": str(out)}, batch_size=200)
    config["outboxes"][0]["pipeline"] = {"publish_batch_size": 100}
    path = write_config(tmp_path, config)
    kills = 0
    for threshold in (3_000, 12_000):
        relay = start_relay(path, capture=True)
        wait_for(lambda t=threshold: out.exists() and out.stat().st_size > t * 300, 60, "progress")
        os.kill(relay.pid, signal.SIGKILL)
        relay.communicate(timeout=10)
        assert relay.returncode == -signal.SIGKILL
        kills += 1
    assert 0 < unpublished(dsn) < 30_000, "the kills happened mid-run"
    result = run_cli("run", "-c", str(path), "--drain", timeout=120)
    assert result.returncode == 0, result.stderr
    duplicates = assert_complete_and_ordered(read_lines(out), event_ids(dsn))
    # At-least-once: repeats are bounded by what was in flight at each kill.
    assert duplicates <= kills * 10_000
    assert unpublished(dsn) == 0


def test_sigterm_finishes_in_flight_events_and_exits_0(dsn: str, tmp_path: Path) -> None:
    insert_events(dsn, 20_000, aggregates=50)
    out = tmp_path / "out.jsonl"
    relay = start_relay(
        write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(out)})), capture=True
    )
    wait_for(lambda: out.exists() and out.stat().st_size > 0, 30, "the first events")
    relay.send_signal(signal.SIGTERM)
    _, stderr = relay.communicate(timeout=30)
    assert relay.returncode == 0, stderr
    assert "stopping: finishing in-flight events" in stderr
    delivered = read_lines(out)
    marked = marked_ids(dsn)
    # Everything marked was delivered, and everything delivered was marked before exit: no duplicates later.
    assert marked == {line["event_id"] for line in delivered}


def _ready(base: str) -> bool | None:
    try:
        return bool(json.loads(http_get(base + "/readyz"))["ready"])
    except OSError:
        return None


def test_check_masks_broker_secrets_given_as_producer_settings(tmp_path: Path) -> None:
    config = relay_config("postgresql://localhost/db", {"type": "stdout"})
    config["outboxes"][0]["sink"] = {
        "type": "kafka",
        "bootstrap_servers": "127.0.0.1:9092",
        "producer": {
            "sasl.mechanism": "PLAIN",
            "sasl.username": "relay",
            "sasl.password": "s3cr3t-pass",
            "security.protocol": "SASL_SSL",
        },
    }
    result = run_cli("check", "-c", str(write_config(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    assert "s3cr3t-pass" not in result.stdout + result.stderr
    assert "sasl.password: '***'" in result.stdout


def test_a_password_with_spaces_or_quotes_never_shows_and_an_unreadable_dsn_is_refused_by_check(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, "DB_PASSWORD": "correct horse battery staple"}
    unreadable = relay_config("host=127.0.0.1 port=1 password=${DB_PASSWORD}", {"type": "stdout"})
    path = write_config(tmp_path, unreadable, "unreadable.yaml")
    result = run_cli("check", "-c", str(path), env=env)
    assert result.returncode == 2
    assert "outboxes[0].source.dsn: is not a connection string libpq can read" in result.stderr
    for word in ("correct", "horse", "battery", "staple"):
        assert word not in result.stdout + result.stderr, word
    readable = relay_config("host=127.0.0.1 port=1 password='${DB_PASSWORD}'", {"type": "stdout"})
    path = write_config(tmp_path, readable, "readable.yaml")
    for command in (("check",), ("check", "--connect"), ("status",)):
        result = run_cli(*command, "-c", str(path), env=env)
        for word in ("correct", "horse", "battery", "staple"):
            assert word not in result.stdout + result.stderr, (command, word)


def test_check_prints_readable_yaml_and_with_json_one_document_for_machines_secrets_masked_in_both(
    tmp_path: Path,
) -> None:
    config = relay_config("postgresql://relay:pa55word@localhost/db", {"type": "stdout"})
    path = write_config(tmp_path, config)
    text = run_cli("check", "-c", str(path))
    assert text.returncode == 0, text.stderr
    assert "pa55word" not in text.stdout
    lines = text.stdout.splitlines()
    assert max(len(line) for line in lines) < 120, "one setting a line, not one long JSON line"
    shown = yaml.safe_load(text.stdout)
    assert shown[str(path)] == "ok"
    settings = shown["outbox orders"]
    assert settings["source"]["dsn"] == "postgresql://relay:***@localhost/db"
    assert settings["pipeline"]["max_in_flight"] == 10_000
    # The process's own settings, defaults included.
    assert shown["relay"]["http"]["port"] == config["http"]["port"]
    assert shown["relay"]["shutdown_grace"] == 30.0
    assert shown["relay"]["log"]["level"] == "info"

    machine = run_cli("check", "-c", str(path), "--json")
    assert machine.returncode == 0, machine.stderr
    document = json.loads(machine.stdout)
    assert "pa55word" not in machine.stdout
    assert document["ok"] is True
    assert [o["outbox"] for o in document["outboxes"]] == ["orders"]
    assert document["outboxes"][0]["settings"] == settings
    assert document["relay"] == shown["relay"]


def test_check_connect_prints_yaml_that_parses_for_a_passing_and_a_failing_connect(
    dsn: str, tmp_path: Path
) -> None:
    good = write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(tmp_path / "out.jsonl")}))
    passing = run_cli("check", "-c", str(good), "--connect")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    document = yaml.safe_load(passing.stdout)
    connect = document["outbox orders"]["connect"]
    assert connect["database"]["ok"] is True
    assert "NOTIFY trigger present" in connect["database"]["notes"]
    assert connect["sink"] == {"ok": True, "notes": []}
    assert document[str(good)] == "ok"
    assert document["outbox orders"]["source"]["table"] == "public.outbox"

    # A file sink in a directory that does not exist: check --connect says so (run could not start).
    missing = tmp_path / "no-such-dir" / "out.jsonl"
    bad = write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(missing)}), "bad.yaml")
    failing = run_cli("check", "-c", str(bad), "--connect")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    connect = yaml.safe_load(failing.stdout)["outbox orders"]["connect"]
    assert connect["database"]["ok"] is True
    assert connect["sink"] == {
        "ok": False,
        "error": f"cannot create {missing}: directory {missing.parent} does not exist",
    }
    assert str(bad) not in yaml.safe_load(failing.stdout)

    machine = run_cli("check", "-c", str(bad), "--connect", "--json")
    assert machine.returncode == 1
    document = json.loads(machine.stdout)
    assert document["ok"] is False
    assert document["outboxes"][0]["connect"] == connect, "the same shape as the YAML's"


def test_check_with_a_dsn_of_a_megabyte_answers_in_seconds_and_never_shows_its_password(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    secret = "hunter2-Very-Secret"
    long_dsn = f"postgresql://app:{secret}@127.0.0.1:1/db?application_name=" + "a" * 1_000_000
    path = write_config(tmp_path, relay_config(long_dsn, {"type": "stdout"}))
    started = time.monotonic()
    result = run_cli("check", "-c", str(path), env=cli_env, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert elapsed < 15, f"check took {elapsed:.0f}s"
    assert secret not in result.stdout + result.stderr
    assert "postgresql://app:***@127.0.0.1:1/db?application_name=aaa" in result.stdout
