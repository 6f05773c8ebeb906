"""What the logical source's failures mean, and how they are told: every message scrubbed of
secrets, the server's words kept, the fix named where there is one.

Two kinds matter to the caller. A broken connection (`psycopg.OperationalError`) passes: the
stream is opened again and the pipeline retries. A change the source cannot turn into an event
(`ConnectorError`) must never be read past: the source stays stuck on it until it is fixed."""

from __future__ import annotations

import psycopg
from psycopg import pq

from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber


def command_failure(result: pq.abc.PGresult | None, pgconn: pq.abc.PGconn) -> str:
    """The server's message for a replication command that failed, scrubbed."""
    message = (result.get_error_message() if result else pgconn.get_error_message()) or "failed"
    return scrubber.scrub(message.strip())


def slot_in_use(message: str) -> bool:
    """Whether START_REPLICATION was refused because another process streams the slot."""
    return "is active for PID" in message


def explain_start_error(config: PostgresLogicalConfig, message: str) -> str:
    """START_REPLICATION's refusal, with what to do about it."""
    message = scrubber.scrub(message)
    if "does not exist" in message and "slot" in message:
        return f"replication slot {config.slot} does not exist (run: outbox-relay init-db): {message}"
    if slot_in_use(message):
        return (
            f"replication slot {config.slot} is in use by another process (the previous lease"
            " holder's stream, which this relay's role may not end?): " + message
        )
    if "publication" in message and "does not exist" in message:
        return f"publication {config.publication} does not exist (run: outbox-relay init-db): {message}"
    return f"START_REPLICATION failed: {message}"


def connection_lost(exc: psycopg.Error) -> psycopg.OperationalError:
    """A failure of the replication connection, as the error the pipeline retries."""
    return psycopg.OperationalError(scrubber.scrub(str(exc)))


def stream_ended(pgconn: pq.abc.PGconn) -> psycopg.OperationalError:
    """The server ended the replication stream (or the connection broke while reading it)."""
    return psycopg.OperationalError(scrubber.scrub(pgconn.get_error_message() or "replication stream ended"))


def undecodable(exc: Exception) -> ConnectorError:
    """A change the source could not turn into an event: a ConnectorError as it is (it already
    says what is wrong and what to do), anything else as a decoding failure."""
    if isinstance(exc, ConnectorError):
        return exc
    return ConnectorError(scrubber.scrub(f"cannot decode the replication stream: {exc!r}"))
