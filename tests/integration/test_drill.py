"""The drill in small form: ~5,000 events, several kills, a broker pause and a database restart,
against a real PostgreSQL and a real broker. It must report 0 lost and 0 order violations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import private_rabbitmq, run_cli
from tests.harness.kafka import KafkaBroker
from tests.harness.postgres import PostgresServer
from tests.harness.rabbitmq import RabbitBroker
from tests.support import relay_config, unpublished, write_config

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
    assert report["broker_outages"] == 1 and report["db_restarts"] == 1, report


def test_drill_against_kafka_with_kills_a_broker_pause_and_a_database_restart_loses_nothing(
    tmp_path: Path, pg: PostgresServer, dsn: str, kafka: KafkaBroker
) -> None:
    if not (pg.owned and kafka.owned):
        pytest.skip("pauses the broker and restarts the database: needs servers this run started")
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
    tmp_path: Path, pg: PostgresServer, dsn: str, private_rabbit: RabbitBroker
) -> None:
    rabbitmq = private_rabbit
    if not (pg.owned and rabbitmq.controllable):
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
