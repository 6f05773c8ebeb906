"""relay.problems: which errors are setup mistakes (that wait for an operator) and which are
outages (that heal by themselves), and how a problem is reported while it lasts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from outbox_relay.connectors.sources.outbox_table import missing_table
from outbox_relay.interfaces import ConnectorError
from outbox_relay.problems import SetupProblems, setup_problem

Op = psycopg.OperationalError


def _sqlstate(text: str, code: str) -> psycopg.Error:
    error: psycopg.Error = psycopg.errors.lookup(code)(text)
    return error


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            Op('connection failed: FATAL:  password authentication failed for user "relay"'),
            "login refused",
        ),
        (Op('connection failed: FATAL:  role "relay" does not exist'), "login refused"),
        (Op("FATAL:  no pg_hba.conf entry for host"), "login refused"),
        (Op('FATAL:  database "shop" does not exist'), "database does not exist"),
        (
            ConnectorError("table public.outbox does not exist (run: outbox-relay init-db)"),
            "table does not exist",
        ),
        (ConnectorError(missing_table("billing.events", mapped=True)), "application's table does not exist"),
        (
            ConnectorError("table public.outbox has no column for columns.payload=body"),
            "column does not exist",
        ),
        (
            ConnectorError("replication slot outbox_relay is missing (run: outbox-relay init-db)"),
            "replication slot or publication missing",
        ),
        (_sqlstate("permission denied for table outbox", "42501"), "permission denied"),
        (_sqlstate("relation does not exist", "42P01"), "table does not exist"),
        (ConnectorError("RabbitMQ refused the login of user guest"), "login refused"),
        (ConnectorError("WRONGPASS invalid username-password pair"), "login refused"),
        (ConnectorError("SASL authentication error: Authentication failed"), "login refused"),
        (ConnectorError("nats: Authorization Violation"), "login refused"),
        (ConnectorError("(530) 'NOT_ALLOWED - vhost adv_x not found'"), "virtual host does not exist"),
        (ConnectorError("Broker: Topic authorization failed"), "permission denied"),
        (ConnectorError("NOPERM no permissions to run the xadd command"), "permission denied"),
        (
            ConnectorError(
                "RabbitMQ closed the channel: 403 ACCESS_REFUSED - exchange name 'amq.orders' contains"
                " reserved prefix 'amq.*'"
            ),
            "permission denied",
        ),
        (
            ConnectorError("(403, 'ACCESS_REFUSED - access to exchange 'x' in vhost '/' refused')"),
            "permission denied",
        ),
        (
            ConnectorError(
                "RabbitMQ refused the login (wrong user or password): 403 ACCESS_REFUSED - Login was"
                " refused using authentication mechanism PLAIN"
            ),
            "login refused",
        ),
        (ConnectorError("cannot open /nowhere/out.jsonl: No such file or directory"), "path does not exist"),
        (ConnectorError("cannot open /tmp: Is a directory"), "path does not exist"),
        (ConnectorError("cannot open /etc/hosts/x: Not a directory"), "path does not exist"),
        (
            ConnectorError("START_REPLICATION failed: logical decoding requires wal_level >= logical"),
            "wal_level is not logical",
        ),
        (
            ConnectorError(
                'publication "p" publishes table public.other, which is not in tables: public.outbox;'
                " its inserts cannot become events (add it to tables:, or remove it from the publication)"
            ),
            "publication does not match the tables",
        ),
        (
            ConnectorError(
                'publication "p" does not match the configured tables: it publishes public.other,'
                " which is not configured"
            ),
            "publication does not match the tables",
        ),
    ],
)
def test_setup_mistakes_are_told_apart_with_a_fix(error: BaseException, kind: str) -> None:
    problem = setup_problem(error)
    assert problem is not None
    assert problem.kind == kind
    assert problem.fix


@pytest.mark.parametrize(
    "error",
    [
        Op('connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused'),
        Op("server closed the connection unexpectedly"),
        _sqlstate("terminating connection due to administrator command", "57P01"),
        ConnectorError("cannot connect to the database: timeout expired"),
        TimeoutError(),
        OSError("[Errno 111] Connection refused"),
    ],
)
def test_outages_are_not_setup_problems(error: BaseException) -> None:
    assert setup_problem(error) is None


def test_a_password_in_the_error_never_reaches_the_problem() -> None:
    from outbox_relay.secrets import scrubber

    scrubber.remember("hunter2-secret")
    problem = setup_problem(Op("password authentication failed: password=hunter2-secret"))
    assert problem is not None
    assert "hunter2-secret" not in problem.text


def test_classifying_a_megabyte_error_takes_linear_time() -> None:
    huge = ConnectorError('role "' + "x" * 2_000_000 + " table " * 100_000)
    started = time.perf_counter()
    setup_problem(huge)
    assert time.perf_counter() - started < 2.0


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def error(self, event: str, **fields: Any) -> None:
        self.lines.append(("error", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


def _gauge(outbox: str) -> float | None:
    return REGISTRY.get_sample_value(
        "outbox_relay_setup_problem", {"outbox": outbox, "component": "database"}
    )


def test_a_problem_is_logged_once_while_it_lasts_shown_and_cleared_when_fixed() -> None:
    log = _Log()
    problems = SetupProblems("problems-unit", log)
    missing = ConnectorError("table public.outbox does not exist (run: outbox-relay init-db)")
    for _ in range(50):
        assert problems.report("database", missing)
    assert [line[0] for line in log.lines] == ["error"]
    assert _gauge("problems-unit") == 1.0
    assert [p["problem"] for p in problems.describe()] == ["table does not exist"]
    assert not problems.report("database", TimeoutError()), "an outage is not a setup problem"
    assert problems.describe() != [], "and does not clear one"
    problems.clear("database")
    assert problems.describe() == []
    assert _gauge("problems-unit") == 0.0
    assert log.lines[-1][:2] == ("info", "setup problem fixed")


def test_an_operation_that_works_does_not_clear_what_another_operation_still_meets() -> None:
    """A role that may SELECT the outbox but not UPDATE it: each fetch works, each mark fails.
    The problem stays (said once, /readyz and the gauge show it) until the marks work."""
    log = _Log()
    problems = SetupProblems("problems-unit-ops", log)
    denied = Op("permission denied for table outbox")
    for _ in range(20):
        assert problems.report("database", denied, operation="ack failed")
        problems.clear("database", operation="fetch failed")
    assert [line[0] for line in log.lines] == ["error"]
    assert [p["problem"] for p in problems.describe()] == ["permission denied"]
    assert _gauge("problems-unit-ops") == 1.0
    problems.clear("database", operation="ack failed")
    assert problems.describe() == []
    assert _gauge("problems-unit-ops") == 0.0


def test_a_lasting_problem_is_logged_again_every_minute_and_a_new_one_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = _Log()
    problems = SetupProblems("problems-unit-2", log)
    missing = ConnectorError("table public.outbox does not exist (run: outbox-relay init-db)")
    clock = [1000.0]
    monkeypatch.setattr("relay.problems.time.monotonic", lambda: clock[0])
    problems.report("database", missing)
    clock[0] += 30
    problems.report("database", missing)
    assert len(log.lines) == 1
    problems.report("database", Op('FATAL:  role "x" does not exist'))
    assert len(log.lines) == 2, "another problem is said at once"
    clock[0] += 61
    problems.report("database", Op('FATAL:  role "x" does not exist'))
    assert len(log.lines) == 3


def test_a_refused_login_names_the_dsn_or_url_and_a_refused_permission_the_privilege() -> None:
    login = setup_problem(ConnectorError("RabbitMQ refused the login of user guest"))
    assert login is not None
    assert login.fix == "check the user and password the DSN or URL gives"
    refused = setup_problem(ConnectorError("RabbitMQ closed the channel: 403 ACCESS_REFUSED - no"))
    assert refused is not None
    assert "password" not in refused.fix


def test_a_file_sink_path_that_does_not_exist_names_sink_path_in_its_fix() -> None:
    problem = setup_problem(ConnectorError("cannot open /nowhere/out.jsonl: No such file or directory"))
    assert problem is not None
    assert "sink.path" in problem.fix


@pytest.mark.parametrize(
    "setting",
    [
        "sslmode=bogus",
        "target_session_attrs=bogus",
        "channel_binding=x",
        "gssencmode=bogus",
        "load_balance_hosts=bogus",
        "host=127.0.0.1,127.0.0.2 port=1,2,3",
    ],
)
def test_a_connection_setting_libpq_refuses_is_a_setup_problem_not_an_outage(setting: str) -> None:
    # libpq itself (no server is reached): the error the relay sees at run time.
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(f"host=127.0.0.1 port=5432 dbname=postgres connect_timeout=5 {setting}")
    problem = setup_problem(caught.value)
    assert problem is not None, str(caught.value)
    assert problem.kind == "connection setting invalid"
    assert "DSN" in problem.fix


def test_a_bad_libpq_setting_from_the_environment_is_a_setup_problem_where_the_relay_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The config's DSN is checked offline; PGSSLMODE and the like reach libpq only at run time.
    from outbox_relay.connectors.sources.postgres_connect import connect

    monkeypatch.setenv("PGSSLMODE", "bogus")
    with pytest.raises(ConnectorError) as caught:
        asyncio.run(connect("host=127.0.0.1 port=5432 dbname=postgres", 5))
    problem = setup_problem(caught.value)
    assert problem is not None, str(caught.value)
    assert problem.kind == "connection setting invalid"
