"""`outbox-relay demo` proves what it claims: it stops writing, drains, reads back what the sink
received and exits 0 only when nothing was lost or out of order; a sink that drops events makes
it fail. Also: the progress of `run --drain` and `drill` off a terminal is plain text."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import run_cli
from tests.harness.postgres import PostgresServer
from tests.support import REPO, free_port, insert_events, relay_config, start_relay, unpublished, write_config

_SUMMARY = re.compile(
    r"written +(?P<written>\d+) events.*\n"
    r" +published +(?P<published>\d+) distinct.*\n"
    r" +lost +(?P<lost>\d+)\n"
    r" +order violations +(?P<violations>\d+) .*\n"
    r" +duplicates +(?P<duplicates>\d+) "
)


def _summary(stdout: str) -> dict[str, int]:
    match = _SUMMARY.search(stdout)
    assert match, f"no summary in: {stdout[-2000:]}"
    return {key: int(value) for key, value in match.groupdict().items()}


def _assert_passed(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = _summary(result.stdout)
    assert summary["written"] > 0
    assert summary["published"] == summary["written"], summary
    assert (summary["lost"], summary["violations"]) == (0, 0), summary
    assert "PASSED" in result.stdout
    assert "\x1b" not in result.stdout + result.stderr, "no escape codes into a pipe"


def test_demo_on_the_suites_postgres_drains_and_proves_nothing_lost_or_reordered(dsn: str) -> None:
    result = run_cli("demo", "--dsn", dsn, "--rate", "100", "--duration", "3s")
    _assert_passed(result)
    assert "OrderPlaced" in result.stdout, "a few sample events are shown"
    assert len(result.stdout.splitlines()) < 30, "samples, not a flood"
    assert "demo: phase=done" in result.stderr
    assert unpublished(dsn) == 0


def test_demo_on_an_application_database_leaves_its_outbox_and_its_relay_alone(dsn: str) -> None:
    """Given --dsn of a database with an application's outbox (and maybe its relay), the demo
    uses tables of its own: the application's pending events are neither published nor counted."""
    insert_events(dsn, 50, aggregates=5)
    result = run_cli("demo", "--dsn", dsn, "--rate", "100", "--duration", "2s")
    _assert_passed(result)
    assert unpublished(dsn) == 50, "the demo relayed the application's own events"
    with psycopg.connect(dsn, autocommit=True) as conn:
        leases = conn.execute("SELECT to_regclass('outbox_relay_leases') IS NOT NULL").fetchone()
        if leases and leases[0]:
            assert conn.execute("SELECT count(*) FROM outbox_relay_leases").fetchone() == (0,)
        trigger = conn.execute(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'outbox_relay_demo'::regclass"
            " AND NOT tgisinternal"
        ).fetchone()
    assert trigger is not None
    assert "'outbox_relay_demo'" in trigger[0], "its own NOTIFY channel"


def test_demo_refuses_a_database_it_cannot_reach_in_one_line_without_the_password() -> None:
    result = run_cli("demo", "--dsn", "postgresql://u:s3cret@127.0.0.1:1/x", "--duration", "1s")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("demo: connection failed"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "s3cret" not in result.stderr


def test_demo_on_the_embedded_postgres_drains_and_proves_nothing_lost_or_reordered(
    cli_env: dict[str, str],
) -> None:
    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("the embedded PostgreSQL needs the demo extra (pgserver)")
    result = run_cli("demo", "--duration", "3s", env=cli_env, timeout=120)
    _assert_passed(result)


def test_a_sink_that_drops_events_makes_the_demo_report_them_lost_and_exit_1(dsn: str) -> None:
    result = run_cli("demo", "--dsn", dsn, "--rate", "100", "--duration", "2s", "--drop-every", "7")
    summary = _summary(result.stdout)
    assert result.returncode == 1, result.stdout[-2000:]
    assert summary["lost"] > 0
    assert summary["published"] + summary["lost"] == summary["written"]
    assert "FAILED" in result.stdout


def test_ctrl_c_in_the_middle_stops_writing_drains_and_ends_with_the_summary(pg: PostgresServer) -> None:
    database = pg.create_database()  # empty: the demo creates what init-db would
    try:
        demo = subprocess.Popen(
            [sys.executable, "-m", "outbox_relay", "demo", "--dsn", database, "--duration", "5m"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        try:
            assert demo.stdout is not None
            first = demo.stdout.readline()  # the first sample: writing and relaying are under way
            assert "OrderPlaced" in first, first + demo.stderr.read() if demo.stderr else first
            demo.send_signal(signal.SIGINT)
            rest, stderr = demo.communicate(timeout=90)
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.communicate()
        result = subprocess.CompletedProcess(demo.args, demo.returncode, first + rest, stderr)
        _assert_passed(result)
        assert "Traceback" not in stderr
    finally:
        pg.drop_database(database)


def test_run_drain_off_a_terminal_shows_plain_progress_lines_among_console_logs(
    dsn: str, tmp_path: Path
) -> None:
    insert_events(dsn, 3000, aggregates=30)
    out = tmp_path / "out.jsonl"
    config = relay_config(dsn, {"type": "file", "path": str(out)})
    config["log"] = {"format": "console", "level": "info"}
    result = run_cli("run", "-c", str(write_config(tmp_path, config)), "--drain")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\x1b" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("drain: ")]
    assert progress, result.stderr[-2000:]
    assert progress[-1].startswith("drain: published=3000 "), progress
    assert result.stdout == ""


def test_run_drain_with_json_logs_keeps_every_stderr_line_one_json_document(dsn: str, tmp_path: Path) -> None:
    """Log collectors parse stderr line by line: the progress comes as records of its own."""
    insert_events(dsn, 3000, aggregates=30)
    out = tmp_path / "out.jsonl"
    path = write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(out)}))
    result = run_cli("run", "-c", str(path), "--drain")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stderr.splitlines()]
    progress = [record for record in records if record["event"] == "drain: progress"]
    assert progress, result.stderr[-2000:]
    assert progress[-1]["published"] == 3000, progress


def test_run_drain_stopped_by_a_signal_before_the_outbox_is_empty_exits_1(dsn: str, tmp_path: Path) -> None:
    """A batch job stopped at its deadline did not drain: its exit code must not say it did."""
    insert_events(dsn, 3, aggregates=3)
    sink = {"type": "webhook", "url": f"http://127.0.0.1:{free_port()}/refused"}  # (nobody listens)
    path = write_config(tmp_path, relay_config(dsn, sink))
    relay = start_relay(path, "--drain", log=tmp_path / "relay.log")
    try:
        time.sleep(3)
        assert relay.poll() is None, "it cannot drain: nobody takes the events"
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=30) == 1, (tmp_path / "relay.log").read_text()[-2000:]
    finally:
        if relay.poll() is None:
            relay.kill()
    assert "stopped before the outbox was empty" in (tmp_path / "relay.log").read_text()
    assert unpublished(dsn) == 3


def test_drill_json_stays_alone_on_stdout_and_its_progress_off_a_terminal_is_plain(
    dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    out.touch()
    path = write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(out)}))
    result = run_cli(
        "drill", "-c", str(path), "--events", "300", "--aggregates", "10", "--rate", "1000",
        "--kill-every", "0", "--drain-timeout", "60s", "--json", timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(result.stdout)  # the report and nothing else
    assert (report["written"], report["lost"]) == (300, 0)
    assert "\x1b" not in result.stderr
    assert any(line.startswith("drill: phase=") for line in result.stderr.splitlines()), result.stderr


def test_the_embedded_demo_is_not_started_when_asked_for_a_bad_duration() -> None:
    result = run_cli("demo", "--duration", "soon", env={**os.environ, "DATABASE_URL": ""})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("--duration: 'soon' is not a duration"), result.stderr
