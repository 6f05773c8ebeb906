"""The drill in small form: ~5,000 events, several kills, a broker pause and a database restart,
against a real PostgreSQL and a real broker. It must report 0 lost and 0 order violations. And
the faults of the active replica (freeze, cut off from the database closing or holding its
connections), which must also be taken over by another replica, in seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import private_rabbitmq, run_cli
from tests.harness.kafka import KafkaBroker
from tests.harness.postgres import PostgresServer
from tests.harness.rabbitmq import RabbitBroker
from tests.support import relay_config, unpublished, wait_for, write_config

pytestmark = pytest.mark.slow


def _drill(tmp_path: Path, config: dict[str, Any], *extra: str) -> dict[str, Any]:
    path = write_config(tmp_path, config)
    result = run_cli(
        "drill", "-c", str(path), "--events", "5000", "--aggregates", "200", "--rate", "1000",
        "--kill-every", "1s", "--replicas", "2", "--drain-timeout", "60s", "--json", *extra,
        timeout=180,
    )  # fmt: skip
    assert result.stdout, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == (0 if report["passed"] else 1)
    return report


def _assert_survived(report: dict[str, Any], dsn: str) -> None:
    shown = json.dumps(report) + f"; unpublished rows left: {unpublished(dsn)}"
    assert report["written"] == 5000, shown
    assert report["lost"] == 0, shown
    assert report["order_violations"] == 0, shown
    assert report["kills"] >= 3, "the relays were really killed"
    assert report["broker_outages"] == 1, report
    assert report["db_restarts"] == 1, report


def test_drill_against_kafka_with_kills_a_broker_pause_and_a_database_restart_loses_nothing(
    tmp_path: Path, controlled_pg: PostgresServer, controlled_dsn: str, controlled_kafka: KafkaBroker
) -> None:
    pg, dsn, kafka = controlled_pg, controlled_dsn, controlled_kafka
    sink = {"type": "kafka", "bootstrap_servers": kafka.bootstrap_servers, "delivery_timeout": "3s"}
    report = _drill(
        tmp_path, relay_config(dsn, sink), "--broker-outage", "2s", "--broker-pid", str(kafka.pid),
        "--db-restart", "--db-restart-command", pg.restart_command(),
    )  # fmt: skip
    _assert_survived(report, dsn)


@pytest.fixture
def private_rabbit() -> Iterator[RabbitBroker]:
    yield from private_rabbitmq()


def test_drill_against_rabbitmq_with_kills_a_broker_outage_and_a_database_restart_loses_nothing(
    tmp_path: Path, controlled_pg: PostgresServer, controlled_dsn: str, private_rabbit: RabbitBroker
) -> None:
    pg, dsn, rabbitmq = controlled_pg, controlled_dsn, private_rabbit
    if not rabbitmq.controllable:
        pytest.skip("stops the broker and restarts the database: needs servers this run started")
    exchange = f"drill-{tmp_path.name}"
    sink = {"type": "rabbitmq", "url": rabbitmq.url, "exchange": exchange, "confirm_timeout": "3s"}
    report = _drill(
        tmp_path, relay_config(dsn, sink), "--broker-outage", "2s",
        "--broker-stop-command", rabbitmq.control_command("stop_app"),
        "--broker-start-command", rabbitmq.control_command("start_app"),
        "--db-restart", "--db-restart-command", pg.restart_command(),
    )  # fmt: skip
    _assert_survived(report, dsn)


# --- faults of the active replica: freeze, cut off (close), cut off (hold) ----------------------

LEASE = {"time": "2s", "check_interval": "500ms"}
FAULTS = ("freeze", "cut-close", "cut-hold")


def _file_config(dsn: str, out: Path, source: dict[str, Any] | None = None) -> dict[str, Any]:
    config = relay_config(dsn, {"type": "file", "path": str(out)})
    outbox = config["outboxes"][0]
    if source is not None:
        outbox["source"] = source
    outbox["lease"] = LEASE
    return config


def _fault_drill(tmp_path: Path, config: dict[str, Any], *flags: str) -> dict[str, Any]:
    """About 15 s of writing: the cuts start first (--cut-every 1s against --freeze-every 3s) and
    the lease lets them take turns, so the first three faults are a close, a freeze, a hold."""
    path = write_config(tmp_path, config)
    result = run_cli(
        "drill", "-c", str(path), "--events", "1800", "--aggregates", "60", "--rate", "120",
        "--cut-every", "1s", "--cut-mode", "both", "--freeze-every", "3s",
        "--drain-timeout", "30s", "--json", "--logs", str(tmp_path / "logs"), *flags,
        timeout=120,
    )  # fmt: skip
    assert result.stdout, result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == (0 if report["passed"] else 1)
    report["lease_story"] = _lease_story(tmp_path / "logs")
    assert any("holds the lease" in line for line in report["lease_story"]), "--logs kept no relay log"
    assert not list((tmp_path / "logs").glob("*/*.yaml")), "--logs kept the configs (their credentials)"
    return report


def _lease_story(logs: Path) -> list[str]:
    """What the replicas said about the lease, in time order (shown when an assertion fails)."""
    words = ("lease", "standby", "took over", "database")
    lines = [
        f"{path.name}: {line}"
        for path in sorted(logs.glob("*/relay-*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if any(word in line for word in words)
    ]
    return sorted(lines, key=lambda line: line.split('"timestamp": "', 1)[-1])[-60:]


def _assert_taken_over(report: dict[str, Any], dsn: str) -> None:
    shown = json.dumps(report, indent=1) + f"; unpublished rows left: {unpublished(dsn)}"
    assert report["written"] == 1800, shown
    assert report["lost"] == 0, shown
    assert report["order_violations"] == 0, shown
    assert report["duplicates"] <= report["duplicates_bound"], shown
    for kind in FAULTS:
        assert report["faults"].get(kind, 0) >= 1, f"no {kind} fault happened: {shown}"
        seen = report["takeover_seconds"][kind]
        assert seen["taken_over"] >= 1, f"no {kind} fault was taken over: {shown}"
        # Within the fault (2x lease.time) or one lease time after it. (Typically 1.5 to 2 s:
        # the lease expires 2 s after the last renewal; a renewal late on a busy machine makes
        # it earlier, so no lower bound but 0.)
        assert 0 < seen["min"] <= seen["median"] <= seen["max"] <= 4.0 + 2.0, shown


def test_a_frozen_or_cut_off_active_polling_relay_is_taken_over_and_nothing_is_lost_or_reordered(
    tmp_path: Path, dsn: str
) -> None:
    config = _file_config(dsn, tmp_path / "out.jsonl")
    report = _fault_drill(tmp_path, config, "--replicas", "3", "--kill-every", "5s")
    _assert_taken_over(report, dsn)
    assert report["kills"] >= 1, "the faults combine with SIGKILLs"


def test_a_frozen_or_cut_off_active_logical_relay_is_taken_over_and_nothing_is_lost_or_reordered(
    tmp_path: Path, dsn: str
) -> None:
    name = f"drill_{uuid.uuid4().hex[:10]}"
    source = {
        "type": "postgres-logical",
        "dsn": dsn,
        "slot": name,
        "publication": name,
        "poll_interval": "100ms",
    }
    config = _file_config(dsn, tmp_path / "out.jsonl", source)
    init = run_cli("init-db", "-c", str(write_config(tmp_path, config, "init.yaml")))
    assert init.returncode == 0, init.stderr
    # 2 replicas: each fault needs the replica that lost the lease the time before to stand by
    # again (while the other streams the slot, its pipeline cannot act, so only the end of its
    # lease's renewals tells it).
    report = _fault_drill(tmp_path, config, "--replicas", "2", "--kill-every", "0")
    _assert_taken_over(report, dsn)


@pytest.mark.parametrize(
    ("dsn_text", "flags", "reason"),
    [
        ("host=db1,db2 dbname=x", ("--cut-every", "2s"), "names several hosts"),
        ("host=/var/run/postgresql dbname=x", ("--cut-every", "2s"), "connects through a Unix socket"),
        ("host=db dbname=x", ("--freeze-every", "2s", "--replicas", "1"), "need --replicas 2 or more"),
        ("host=db dbname=x", ("--cut-every", "2s", "--cut-for", "0"), "--cut-for must be more than 0"),
        ("host=db dbname=x", ("--freeze-every", "soon"), "--freeze-every: 'soon' is not a duration"),
    ],
)
def test_faults_the_setup_cannot_take_are_refused_in_one_line_before_anything_runs(
    tmp_path: Path, dsn_text: str, flags: tuple[str, ...], reason: str
) -> None:
    config = relay_config(dsn_text + " password=s3cret", {"type": "file", "path": str(tmp_path / "out")})
    path = write_config(tmp_path, config)
    result = run_cli("drill", "-c", str(path), "--replicas", "2", *flags)
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "s3cret" not in result.stderr


def _processes_naming(text: str) -> list[int]:
    """PIDs of the processes whose command line names `text` (a path only this test uses)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # (gone meanwhile)
            continue
    return found


def test_a_sigterm_ends_the_drill_with_its_relays_and_its_temporary_files(dsn: str, tmp_path: Path) -> None:
    """As Ctrl-C does: by default SIGTERM ended the drill alone, its relays ran on (holding the
    lease) and their configs, with the credentials, stayed in the temporary directory."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out.jsonl"
    out.touch()
    path = write_config(tmp_path, relay_config(dsn, {"type": "file", "path": str(out)}))
    drill = subprocess.Popen(
        [sys.executable, "-m", "outbox_relay", "drill", "-c", str(path), "--events", "100000",
         "--rate", "500", "--replicas", "2", "--kill-every", "0"],
        env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for(lambda: len(_processes_naming(str(scratch))) >= 2, 30, "the drill's relays to start")
        drill.send_signal(signal.SIGTERM)
        assert drill.wait(timeout=60) != 0
    finally:
        if drill.poll() is None:
            drill.kill()
    left = _processes_naming(str(scratch))
    for pid in left:  # (only processes started from this test's own scratch directory)
        os.kill(pid, signal.SIGKILL)
    assert left == [], "the drill's relays outlived it"
    assert not list(scratch.rglob("*.yaml")), "the relays' configs (their credentials) stayed behind"
