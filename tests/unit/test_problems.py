"""relay.problems: which errors are setup mistakes (that wait for an operator) and which are
outages (that heal by themselves), and how a problem is reported while it lasts."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY

from relay.interfaces import ConnectorError
from relay.problems import SetupProblems, setup_problem

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
    ],
)
def test_setup_mistakes_are_told_apart_with_a_fix(error: BaseException, kind: str) -> None:
    problem = setup_problem(error)
    assert problem is not None and problem.kind == kind
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
    from relay.secrets import scrubber

    scrubber.remember("hunter2-secret")
    problem = setup_problem(Op("password authentication failed: password=hunter2-secret"))
    assert problem is not None and "hunter2-secret" not in problem.text


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
    assert problems.describe() == [] and _gauge("problems-unit") == 0.0
    assert log.lines[-1][:2] == ("info", "setup problem fixed")


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
