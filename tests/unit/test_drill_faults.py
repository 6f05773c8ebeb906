"""The drill's cut fault puts a proxy between each relay and its database: which server the proxy
connects to, and the DSN the relay then uses."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from outbox_relay.tools.drill_faults import (
    FaultRecord,
    FaultSetupError,
    proxy_target,
    same_database,
    through_proxy,
)


@pytest.fixture(autouse=True)
def _no_libpq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PGHOST", "PGHOSTADDR", "PGPORT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("dsn", "target"),
    [
        ("host=db.example.com port=6432 dbname=app", ("db.example.com", 6432)),
        ("postgresql://app:pw@db.example.com/app", ("db.example.com", 5432)),
        ("host=db.example.com hostaddr=10.0.0.7 dbname=app", ("10.0.0.7", 5432)),
        ("hostaddr=10.0.0.7 port=5433", ("10.0.0.7", 5433)),
    ],
)
def test_the_proxy_connects_to_the_address_the_dsn_names_and_port_5432_when_none_is_given(
    dsn: str, target: tuple[str, int]
) -> None:
    assert proxy_target(dsn) == target


def test_the_libpq_environment_counts_where_the_dsn_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "db.example.com")
    monkeypatch.setenv("PGPORT", "7000")
    assert proxy_target("dbname=app") == ("db.example.com", 7000)


@pytest.mark.parametrize(
    ("dsn", "reason"),
    [
        ("host=a,b dbname=app", "several hosts"),
        ("postgresql://app:s3cret@a:5432,b:5432/app", "several hosts"),
        ("host=/var/run/postgresql dbname=app", "Unix socket"),
        ("dbname=app", "Unix socket"),
    ],
)
def test_several_hosts_or_a_unix_socket_are_refused_without_showing_the_dsn(dsn: str, reason: str) -> None:
    with pytest.raises(FaultSetupError, match=reason) as raised:
        proxy_target(dsn if "s3cret" in dsn else dsn + " password=s3cret")
    assert "s3cret" not in str(raised.value)


def test_through_the_proxy_the_host_stays_for_tls_and_address_and_port_are_the_proxys() -> None:
    dsn = "postgresql://app:s3cret@db.example.com:6432/app?sslmode=verify-full"
    params = conninfo_to_dict(through_proxy(dsn, 40001))
    assert params == {
        "user": "app",
        "password": "s3cret",
        "host": "db.example.com",
        "hostaddr": "127.0.0.1",
        "port": "40001",
        "dbname": "app",
        "sslmode": "verify-full",
    }


def test_a_dead_letter_dsn_spelled_otherwise_is_still_the_same_database() -> None:
    assert same_database("postgresql://a@db:5432/app", "host=db port=5432 dbname=app user=b")
    assert not same_database("postgresql://a@db:5432/app", "host=db port=5432 dbname=other")


def test_takeover_times_are_summed_up_per_fault_kind_with_faults_never_taken_over_counted() -> None:
    record = FaultRecord(
        counts={"freeze": 3, "cut-hold": 1},
        takeovers={"freeze": [2.0, 1.5, 1.75]},
    )
    assert record.summary() == {
        "freeze": {"faults": 3, "taken_over": 3, "min": 1.5, "median": 1.75, "max": 2.0},
        "cut-hold": {"faults": 1, "taken_over": 0},
    }
