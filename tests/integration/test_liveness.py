"""Liveness as the kubelet sees it: `outbox-relay run` as a child process whose publish call
hangs (a webhook receiver that accepts connections and never answers, with a webhook timeout
far beyond `http.stuck_after`), against a real PostgreSQL."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    free_port,
    http_get,
    insert_events,
    relay_config,
    start_relay,
    wait_for,
    write_config,
)

pytest.importorskip("httpx")

STUCK_AFTER = 2.0


@pytest.fixture
def silent_receiver() -> Iterator[str]:
    """A URL whose server completes the TCP handshake (the kernel does, for a listening socket)
    and takes the request, but never accepts the connection, so never answers."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/events"


def _healthz(base: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _stalled_seconds(base: str) -> float:
    found = re.search(
        r'^outbox_relay_stalled_seconds\{outbox="orders"\} (\S+)$', http_get(base + "/metrics"), re.M
    )
    assert found, "the gauge is exported"
    return float(found.group(1))


def test_healthz_fails_naming_the_outbox_and_stage_when_a_publish_never_returns(
    dsn: str, tmp_path: Path, silent_receiver: str
) -> None:
    config = relay_config(dsn, {"type": "webhook", "url": silent_receiver, "timeout": "10m"})
    port = free_port()
    config["http"] = {"port": port, "host": "127.0.0.1", "stuck_after": f"{STUCK_AFTER:g}s"}
    config["shutdown_grace"] = "1s"
    log = tmp_path / "relay.log"
    relay = start_relay(write_config(tmp_path, config), log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _active_and_ready(base), 20, "the relay to start as the active one")
        # Idle: waiting for events (polls, NOTIFY) for longer than stuck_after is not a stall.
        time.sleep(2 * STUCK_AFTER)
        assert _healthz(base) == (200, {"status": "alive"})
        # A poll may be out at the moment of the scrape: a fresh call, far below the threshold.
        assert _stalled_seconds(base) < STUCK_AFTER / 2

        insert_events(dsn, 5)
        wait_for(lambda: _healthz(base)[0] == 503, 30, "/healthz to fail")
        status, body = _healthz(base)
        assert status == 503
        assert body["status"] == "stuck"
        assert isinstance(body["outboxes"], dict)
        assert body["outboxes"]["orders"]["stage"] == "publish"
        assert body["outboxes"]["orders"]["seconds"] >= STUCK_AFTER
        assert _stalled_seconds(base) > STUCK_AFTER
        assert json.loads(http_get(base + "/readyz"))["outboxes"]["orders"]["role"] == "active"
    finally:
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(timeout=30)
    # The publish still hangs when SIGTERM comes: the grace period ends it.
    assert code == 1
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    stalls = [line for line in lines if line["event"].startswith("stalled")]
    assert len(stalls) == 1, "one line when the stall is first seen, not one per probe"
    assert stalls[0]["level"] == "error"
    assert stalls[0]["outbox"] == "orders"
    assert stalls[0]["stage"] == "publish"


def _active_and_ready(base: str) -> bool:
    try:
        ready = json.loads(http_get(base + "/readyz"))
    except OSError:
        return False
    return bool(ready["ready"]) and ready["outboxes"]["orders"]["role"] == "active"
