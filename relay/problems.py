"""Telling a setup mistake from an outage.

A database that restarts or a network that drops heals by itself: the relay retries quietly and
goes on. A missing table, a refused login or a missing privilege does not heal until an operator
acts, and an operator must see it at once, not as one more "retrying" line. `setup_problem` says
which of the two an error is; `SetupProblems` keeps the ones an outbox has now and makes them
unmistakable in three places: one error line when a problem appears (repeated every minute while
it lasts, not at every retry), /readyz (`problem` names it), and the gauge
`outbox_relay_setup_problem{outbox,component}`. The relay still retries: the operator may fix the
setup while it runs (run init-db, grant the privilege), and it then goes on without a restart.

The server's error code says what happened where there is one; a failed login carries none
(libpq reports it as text), so the English messages of PostgreSQL and of our own connectors are
read too. Every pattern is linear: no nested quantifiers, nothing that backtracks.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from outbox_relay import metrics
from outbox_relay.secrets import scrubber


@dataclass(frozen=True, slots=True)
class SetupProblem:
    """A mistake in the setup: `kind` (a few words), `text` (the error, one line) and `fix`."""

    kind: str
    text: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return {"problem": self.kind, "error": self.text, "fix": self.fix}


_BY_SQLSTATE = {
    "28000": "login refused",
    "28P01": "login refused",
    "3D000": "database does not exist",
    "3F000": "schema does not exist",
    "42501": "permission denied",
    "42P01": "table does not exist",
    "42703": "column does not exist",
    "42704": "object does not exist",
    "25006": "database is read-only",
}
_BY_TEXT = tuple(
    (kind, re.compile(pattern, re.IGNORECASE))
    for kind, pattern in (
        ("login refused", r"password authentication failed|no pg_hba\.conf entry|password is required"),
        ("login refused", r"role \"[^\"]*\" does not exist|authentication failed|no password supplied"),
        # Brokers (RabbitMQ, Redis, NATS, Kafka's SASL) refusing the credentials they were given.
        # (RabbitMQ's ACCESS_REFUSED is a refused login only when it says so: a channel's 403
        # is a missing permission or a reserved name.)
        ("login refused", r"refused the login|Login was refused|WRONGPASS|NOAUTH|authorization violation"),
        ("login refused", r"SASL authentication error"),
        ("virtual host does not exist", r"vhost \S+ not found|refused access to the virtual host"),
        ("permission denied", r"permission denied|must be superuser|lacks the REPLICATION attribute"),
        ("permission denied", r"NOPERM|permissions violation|authorization failed|ACCESS_REFUSED"),
        # libpq refusing a connection setting before it connects: no retry can heal it.
        ("connection setting invalid", r"invalid \w+ value: |could not match \d+ (port|host) \w+ to"),
        # The file sink's path (its directory missing, or not a directory).
        ("path does not exist", r"^cannot open .*: (No such file or directory|(Is|Not) a directory)$"),
        ("path does not exist", r"^cannot append to .*, not a regular file"),
        ("database does not exist", r"database \"[^\"]*\" does not exist"),
        ("database is read-only", r"read-only transaction|session is read-only"),
        (
            "application's table does not exist",
            r"it is the application's table, which init-db does not create",
        ),
        ("table does not exist", r"table \S+ does not exist|relation \"[^\"]*\" does not exist"),
        ("replication slot or publication missing", r"replication slot \S+ is missing"),
        ("replication slot or publication missing", r"publication \"[^\"]*\" does not exist"),
        ("column does not exist", r"has no column|column \"[^\"]*\" does not exist"),
        ("replicas use different lease tables", r"holds this outbox's lease in another table"),
        ("replication slot in use", r"replication slot \S+ is in use by another process"),
        (
            "wal_level is not logical",
            r"logical decoding requires wal_level|logical replication needs wal_level",
        ),
        # (Found at start, or while streaming once the publication changed.)
        ("publication does not match the tables", r"does not match the configured tables"),
        ("publication does not match the tables", r"publishes table .{1,300}?, which is not in tables"),
    )
)
_FIXES = {
    "login refused": "check the user and password the DSN or URL gives",
    "connection setting invalid": "correct the setting the DSN gives (libpq names it and its value)",
    "path does not exist": "check sink.path: its directory must exist and the path must name a file",
    "database does not exist": "check the database name the DSN gives",
    "virtual host does not exist": "check the virtual host the URL gives, or create it on the broker",
    "database is read-only": "point the DSN at the primary (or turn off default_transaction_read_only)",
    "schema does not exist": "check the table's schema in the config, or create the schema (init-db"
    " creates a missing one only for the outbox table it creates, not for the dead-letter or lease table)",
    "permission denied": "grant the relay's role the privilege the message names (the outbox table:"
    " SELECT, and UPDATE to mark or DELETE to delete; the dead-letter and lease tables: SELECT, INSERT,"
    " UPDATE and DELETE)",
    "table does not exist": "check the table's name in the config, or run: outbox-relay init-db (it creates"
    " the relay's own tables, not an application's table with a columns mapping)",
    "application's table does not exist": "check the table's name in the config, or create the table"
    " (outbox-relay init-db --print-sql prints a CREATE TABLE with the mapped columns)",
    "column does not exist": "check the config's columns mapping against the table",
    "object does not exist": "run: outbox-relay init-db, or check the names in the config",
    "replication slot or publication missing": "run: outbox-relay init-db",
    "broker refused the relay": "check the sink's credentials and what the broker permits them",
    "replicas use different lease tables": "give every replica of this outbox the same lease.table"
    " (schema-qualified, or the same search_path)",
    "publication does not match the tables": "make the publication publish the inserts of exactly the"
    " source's tables: (init-db adds the ones it lacks; drop others with ALTER PUBLICATION ... DROP TABLE);"
    " inserts into another table already in the slot still stop the outbox: see the postgres-logical"
    " source's docs, 'Changing the publication while the relay runs'",
    "wal_level is not logical": "set wal_level = logical in postgresql.conf and restart PostgreSQL"
    " (or use the postgres-polling source, which needs no replication)",
    "replication slot in use": "let the relays' role end the previous holder's sessions (the same"
    " role for every replica, or GRANT pg_signal_backend); else the server frees the slot only once"
    " wal_sender_timeout ends the old stream",
}
#: The kind of a sink's `Failure(setup=True)`: the broker refused the relay's credentials or
#: permissions for an event.
BROKER_REFUSED = "broker refused the relay"
_LONGEST_TEXT = 2000  # what is matched and shown of an error's text


def setup_problem(exc: BaseException) -> SetupProblem | None:
    """The setup mistake `exc` reports, or None when it may heal by itself (an outage)."""
    # Scrubbed before its white space is folded: a secret holding two spaces or a tab is found.
    text = " ".join(scrubber.scrub_shortened(str(exc), _LONGEST_TEXT).split())[:_LONGEST_TEXT]
    text = text or type(exc).__name__
    kind = _BY_SQLSTATE.get(str(getattr(exc, "sqlstate", None) or ""))
    if kind is None:
        kind = next((k for k, pattern in _BY_TEXT if pattern.search(text)), None)
    if kind is None:
        return None
    return SetupProblem(kind, text, _FIXES[kind])


class SetupProblems:
    """The setup problems one outbox has now, by component ("database", "sink") and, within one,
    by the operation that met it (a fetch, an acknowledgement, a dead letter...): one operation
    that works again does not clear what another still meets (a role may SELECT the outbox but
    not UPDATE it). Not thread-safe: used from the event loop only."""

    REPEAT_EVERY_S = 60.0

    def __init__(self, outbox: str, log: Any) -> None:
        self._outbox = outbox
        self._log = log
        self._now: dict[tuple[str, str], SetupProblem] = {}
        self._logged_at: dict[tuple[str, str], float] = {}

    def report(self, component: str, exc: BaseException, operation: str = "") -> bool:
        """Record `exc` if it is a setup problem (True), logging it when it is new or a minute
        has passed since it was last logged; False for an outage, which clears nothing."""
        problem = setup_problem(exc)
        if problem is None:
            return False
        self._record((component, operation), problem)
        return True

    def report_refusal(self, component: str, reason: str) -> None:
        """The broker refused the relay itself for an event (a `Failure` with `setup`)."""
        text = " ".join(scrubber.scrub_shortened(reason, _LONGEST_TEXT).split())[:_LONGEST_TEXT]
        self._record((component, ""), SetupProblem(BROKER_REFUSED, text, _FIXES[BROKER_REFUSED]))

    def _record(self, key: tuple[str, str], problem: SetupProblem) -> None:
        now = time.monotonic()
        previous = self._now.get(key)
        if (
            previous is None
            or previous.kind != problem.kind
            or now - self._logged_at.get(key, 0.0) >= self.REPEAT_EVERY_S
        ):
            self._log.error(
                "setup problem: the relay cannot go on until it is fixed (it keeps retrying)",
                component=key[0],
                problem=problem.kind,
                error=problem.text,
                fix=problem.fix,
            )
            self._logged_at[key] = now
        self._now[key] = problem
        metrics.SETUP_PROBLEM.labels(self._outbox, key[0]).set(1)

    def clear(self, component: str, operation: str = "") -> None:
        """`operation` of `component` works again: its problem, if it had one, is fixed."""
        problem = self._now.pop((component, operation), None)
        if problem is None:
            return
        self._logged_at.pop((component, operation), None)
        self._log.info("setup problem fixed", component=component, problem=problem.kind)
        if not any(key[0] == component for key in self._now):
            metrics.SETUP_PROBLEM.labels(self._outbox, component).set(0)

    def describe(self) -> list[dict[str, str]]:
        """The problems for /readyz: component, problem, error and fix of each (none: empty)."""
        return [{"component": key[0], **p.as_dict()} for key, p in sorted(self._now.items())]
