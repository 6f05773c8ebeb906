"""The active relay's data connection held open by something that stopped forwarding (a proxy,
a NAT, a firewall: TCP stays up, not a byte goes through either way) while its lease
connection works: the relay notices within its timeout (`receive_timeout` for the replication
stream, `query_timeout` for the polling source's statements), reconnects, and delivers what
was written meanwhile, nothing lost and each aggregate in order (a real PostgreSQL, a relay
process, a proxy between them that holds that one connection only)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import StartRelay, webhook_request_as_lines
from tests.harness.proxy import HoldOneProxy
from tests.harness.webhook import WebhookReceiver
from tests.support import (
    assert_complete_and_ordered,
    event_ids,
    insert_events,
    relay_config,
    unpublished,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow

#: The timeout under test: short, so the test is; the defaults are a minute.
TIMEOUT_S = 2.0

#: The session of each source's data path: the replication stream (its walsender), the polling
#: source's fetch connection (the last statement it ran reads the outbox, FOR UPDATE or not).
_LOGICAL_DATA = (
    "SELECT a.client_port FROM pg_replication_slots s JOIN pg_stat_activity a ON a.pid = s.active_pid"
    " WHERE s.slot_name = 'outbox_relay'"
)
#: The polling source's sessions by the statement each ran last: `fetch` reads (and sweeps) in
#: position order or lists the table's writers (not the backlog's count), `ack` marks under the
#: lease's fence.
_POLLING_DATA = {
    "fetch": "(query LIKE '%%ORDER BY%%LIMIT%%' OR query LIKE '%%RowExclusiveLock%%')"
    " AND query NOT LIKE 'SELECT count(%%'",
    "ack": "query LIKE 'WITH fence AS%%'",
}


def _polling_session(role: str) -> str:
    return (
        "SELECT client_port FROM pg_stat_activity WHERE application_name LIKE 'outbox-relay%%'"
        f" AND pid <> pg_backend_pid() AND {_POLLING_DATA[role]}"
    )


@pytest.fixture
def proxy(dsn: str) -> Iterator[HoldOneProxy]:
    with HoldOneProxy(int(conninfo_to_dict(dsn).get("port") or 5432)) as held:
        yield held


def _data_port(dsn: str, query: str) -> int | None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(query).fetchall()
    return int(rows[0][0]) if len(rows) == 1 else None


def _delivered(receiver: WebhookReceiver) -> list[dict[str, Any]]:
    return [line for request in receiver.received() for line in webhook_request_as_lines(request)]


def _relay_through(
    proxy: HoldOneProxy, dsn: str, tmp_path: Path, **source: Any
) -> tuple[Path, WebhookReceiver]:
    receiver = WebhookReceiver()
    through = make_conninfo(dsn, host="127.0.0.1", port=str(proxy.port))
    sink = {"type": "webhook", "url": receiver.url, "max_concurrency": 1}
    config = relay_config(through, sink, **source)
    config["outboxes"][0]["lease"] = {"time": "2s", "check_interval": "500ms"}
    return write_config(tmp_path, config), receiver


def _holds_then_delivers(
    dsn: str, proxy: HoldOneProxy, tmp_path: Path, start_relay: StartRelay, data_query: str, **source: Any
) -> str:
    """Start a relay through `proxy`, hold its data connection once it delivered a first batch,
    write more during the hold; returns its log once every event was delivered in order."""
    path, receiver = _relay_through(proxy, dsn, tmp_path, **source)
    with receiver:
        start_relay(path)
        insert_events(dsn, 200, aggregates=10)
        wait_for(lambda: len(_delivered(receiver)) >= 200, 30, "the first batch delivered")
        port: int | None = None

        def found() -> bool:
            nonlocal port
            port = _data_port(dsn, data_query)
            return port is not None

        wait_for(found, 10, "the data connection's session")
        assert port is not None
        proxy.hold(port)
        held_at = time.monotonic()
        for _ in range(5):  # written during the hold, in several transactions
            insert_events(dsn, 100, aggregates=10)
            time.sleep(0.2)
        expected = event_ids(dsn)

        def all_there() -> bool:
            return expected <= {line["event_id"] for line in _delivered(receiver)}

        wait_for(all_there, TIMEOUT_S * 10, "every event written during the hold delivered")
        print(f"delivered everything {time.monotonic() - held_at:.1f}s after the hold began")
        duplicates = assert_complete_and_ordered(_delivered(receiver), expected)
        print(f"{duplicates} duplicates")
    return _log(tmp_path)


def _log(tmp_path: Path) -> str:
    return "".join(log.read_text() for log in sorted(tmp_path.glob("relay-*.log")))


def test_a_logical_relay_whose_replication_stream_is_held_reconnects_and_delivers_everything_in_order(
    dsn: str, proxy: HoldOneProxy, tmp_path: Path, start_relay: StartRelay
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE PUBLICATION outbox_relay FOR TABLE outbox")
        conn.execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')")
    log = _holds_then_delivers(
        dsn,
        proxy,
        tmp_path,
        start_relay,
        _LOGICAL_DATA,
        type="postgres-logical",
        mode="table",
        receive_timeout=f"{TIMEOUT_S:g}s",
        # (No heartbeats, and status updates rarer than the timeout: only the question at half
        # of it gets an answer from an idle server in time.)
        heartbeat_interval=0,
        status_interval="5s",
        poll_interval="100ms",
    )
    assert "replication stream silent for 2s; reconnecting" in log


@pytest.mark.parametrize("role", ["fetch", "ack"])
def test_a_polling_relay_whose_fetch_or_mark_connection_is_held_reconnects_and_delivers_everything_in_order(
    dsn: str, proxy: HoldOneProxy, tmp_path: Path, start_relay: StartRelay, role: str
) -> None:
    log = _holds_then_delivers(
        dsn, proxy, tmp_path, start_relay, _polling_session(role), query_timeout=f"{TIMEOUT_S:g}s"
    )
    # (Events are delivered before they are marked: a held mark shows only once the rest are.)
    wait_for(lambda: unpublished(dsn) == 0, TIMEOUT_S * 5, "every row marked")
    assert "database did not answer within 2s; reconnecting" in log + _log(tmp_path)
