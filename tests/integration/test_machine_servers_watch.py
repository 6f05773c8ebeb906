"""The watch that proves a test run leaves the machine's own servers as they were
(tests/harness/machine_servers.py) notices a stop, a restart and a reconfiguration, shown on
servers this test starts itself."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import private_rabbitmq
from tests.harness.machine_servers import MachineServers, watch_machine_servers
from tests.harness.nats import start_nats
from tests.harness.postgres import PostgresServer
from tests.harness.redis import start_redis


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


def _watch(server: str, port: int) -> MachineServers:
    watched = watch_machine_servers({server: port})
    assert watched.watched == [server], f"{server} on {port} was not fingerprinted"
    assert watched.changes() == []
    return watched


def test_the_watch_sees_a_redis_setting_changed_and_a_redis_restarted() -> None:
    pytest.importorskip("redis")
    import redis

    with start_redis(private=True) as server:
        watched = _watch("redis", _port(server.url))
        try:
            client = redis.Redis.from_url(server.url)
            client.config_set("maxmemory-policy", "allkeys-lru")
            client.close()
            assert any("redis: config" in change for change in watched.changes())
            server.stop()
            server.start()
            assert any("redis: run_id" in change for change in watched.changes())
        finally:
            watched.close()


def test_the_watch_sees_a_nats_server_restarted() -> None:
    with start_nats(private=True) as server:
        watched = _watch("nats", _port(server.url))
        try:
            server.stop()
            assert watched.changes() == ["nats: no longer answers"]
            server.start()
            assert any("nats: server_id" in change for change in watched.changes())
        finally:
            watched.close()


def test_the_watch_sees_a_rabbitmq_app_stopped_and_started_again() -> None:
    pytest.importorskip("pika")
    for broker in private_rabbitmq():
        if not broker.owned:
            pytest.skip("no rabbitmq-server package here to start a node of our own")
        watched = _watch("rabbitmq", _port(broker.url))
        try:
            broker.stop()
            broker.start()
            changes = watched.changes()
            assert any("rabbitmq: the connection held since the start was closed" in c for c in changes)
        finally:
            watched.close()


def test_the_watch_sees_a_postgres_configuration_reloaded(controlled_pg: PostgresServer) -> None:
    pg = controlled_pg
    watched = _watch("postgres", _port(pg.dsn))
    try:
        time.sleep(0.01)  # pg_conf_load_time has microseconds; make the reload's time differ
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while not (changes := watched.changes()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the postmaster reloads asynchronously
        assert any("postgres: configuration loaded" in change for change in changes)
    finally:
        watched.close()
