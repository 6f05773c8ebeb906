"""The PostgreSQL session every connection of the relay opens (the sources' connections, the
replication stream, the dead-letter store, the lease): one place for the settings whose text
output the relay reads, so that a database, role or service-file default cannot change what it
parses.

- `client_encoding=UTF8` (a connection parameter): the server converts text from the database's
  encoding (LATIN1, WIN1252, EUC_JP, ...), so everything the relay reads is UTF-8.
- `DateStyle=ISO`, `TimeZone=UTC`: timestamptz text (pgoutput sends `created_at` as text).
- `bytea_output=hex`: pgoutput's text form of a bytea payload is decoded as hex.
- `extra_float_digits=3`: float8 text keeps every digit (the polling source reads
  `extract(epoch ...)` as float8).

The last four are SET once connected, not passed as the connection's `options`: that would
replace `options` a libpq service file or PGOPTIONS gives (a search_path, say).

A database in SQL_ASCII cannot be served: it stores bytes without saying which characters they
are, so no conversion to UTF-8 is possible. `start_session` says so in one sentence.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Annotated, Any, TypeVar

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.abc import Params
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import AfterValidator

from outbox_relay.interfaces import Unsupported

T = TypeVar("T")

#: The session settings the relay pins on every connection (name, value).
PINNED_SETTINGS: tuple[tuple[str, str], ...] = (
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "3"),
)


#: Settings libpq checks only when it connects (PostgreSQL 16's libpq documents these values;
#: libpq compares them exactly, case included): a bad one would fail every attempt.
_ENUMERATED_SETTINGS: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
    "channel_binding": ("disable", "prefer", "require"),
    "gssencmode": ("disable", "prefer", "require"),
    "load_balance_hosts": ("disable", "random"),
}


def _readable_dsn(value: str) -> str:
    """A DSN libpq can read and would connect with, checked when the config is loaded (never
    echoed: it may hold a password), so that `check` refuses it instead of `run` retrying it
    forever."""
    if not value.strip():
        raise ValueError(
            "is empty (libpq would connect to its defaults, a local socket and another database):"
            " give the database's connection string or URL"
        )
    try:
        params = conninfo_to_dict(value)
    except Exception:
        raise ValueError(
            "is not a connection string libpq can read (key=value pairs, values with spaces in"
            " single quotes, or a postgresql:// URL)"
        ) from None
    # libpq reads the port only when it connects: a bad one would fail every attempt.
    for port in str(params.get("port") or "").split(","):
        if port.strip() and not (port.strip().isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("has a port that is not a number from 1 to 65535")
    for key, allowed in _ENUMERATED_SETTINGS.items():
        setting = params.get(key)
        if setting is not None and str(setting) not in allowed:
            raise ValueError(f"has {key} set to a value libpq does not know (one of: {', '.join(allowed)})")
    _matching_host_counts(params)
    return value


def _matching_host_counts(params: dict[str, Any]) -> None:
    """libpq takes a list of hosts (`host=a,b`) with one port for all or one port each, and
    `hostaddr` one per host: any other count fails every connection attempt."""
    hosts = _count(params.get("host"))
    addresses = _count(params.get("hostaddr"))
    ports = _count(params.get("port"))
    servers = hosts or addresses
    if hosts and addresses and hosts != addresses:
        raise ValueError(f"has {addresses} hostaddr values for {hosts} hosts (give one per host)")
    if ports > 1 and ports != max(servers, 1):
        raise ValueError(
            f"has {ports} ports for {max(servers, 1)} hosts (give one port for all hosts, or one per host)"
        )


def _count(setting: Any) -> int:
    """How many comma-separated entries a libpq list setting has (0 when unset or empty)."""
    return len(str(setting).split(",")) if setting else 0


#: A libpq connection string or URL, as a config value.
Dsn = Annotated[str, AfterValidator(_readable_dsn)]


def server_place(dsn: str) -> str:
    """The server a DSN names, as far as its text and the PG* variables say (`host:port`):
    equal for two spellings of one connection string; `check --connect` asks the servers."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "(local socket)")
    port = str(params.get("port") or os.environ.get("PGPORT") or "")
    # Ports as numbers (libpq reads 05432 as 5432), the default where one is left out.
    ports = ",".join(str(int(p)) if p.strip().isdigit() else (p.strip() or "5432") for p in port.split(","))
    return f"{host.lower()}:{ports}"


def database_place(dsn: str) -> str:
    """The database a DSN names (`host:port/database`), like `server_place`."""
    params = conninfo_to_dict(dsn)
    user = params.get("user") or os.environ.get("PGUSER") or ""
    database = params.get("dbname") or os.environ.get("PGDATABASE") or user
    return f"{server_place(dsn)}/{database}"


#: The name every session of the relay goes by in pg_stat_activity (`application_name`). A
#: lease holder sets it for the tasks of its outbox (`outbox-relay <holder id>`), so that a new
#: holder can end the sessions of one that froze or was cut off (relay.leadership).
SESSION_NAME: ContextVar[str] = ContextVar("outbox_relay_session_name", default="outbox-relay")


def session_conninfo(dsn: str) -> str:
    """`dsn` (a libpq connection string or URL) with the client encoding the relay reads and
    the session's name (SESSION_NAME). Raises psycopg.ProgrammingError for a DSN libpq cannot
    read."""
    return make_conninfo(dsn, client_encoding="UTF8", application_name=SESSION_NAME.get())


async def fetch_rows(
    conn: AsyncConnection[Any], query: sql.SQL | sql.Composed | str, params: Params | None
) -> list[tuple[Any, ...]]:
    """Run one statement and return its rows (none for a statement without)."""
    cur = await conn.execute(query, params)
    return list(await cur.fetchall()) if cur.description is not None else []


class Unanswered(TimeoutError):
    """A statement was sent and no answer came within its bound. The server may still run it
    (and commit it) later: a caller must not take it for one that never happened."""


async def bounded_query(
    conn: AsyncConnection[Any],
    query: sql.SQL | sql.Composed | str,
    params: Params | None,
    timeout: float,
) -> list[tuple[Any, ...]]:
    """Run one statement and return its rows, or raise Unanswered (a TimeoutError) after
    `timeout` seconds (see `bounded`)."""
    return await bounded(conn, fetch_rows(conn, query, params), timeout)


async def bounded(conn: AsyncConnection[Any], work: Awaitable[T], timeout: float) -> T:
    """The result of `work` (statements on `conn`), or Unanswered (a TimeoutError) after
    `timeout` seconds.

    `asyncio.wait_for` around a psycopg query is not a bound: cancelling it makes psycopg ask
    the server to cancel the query and wait for that, up to 10 s more, over the same network
    that stopped answering. Here the connection is severed instead (its socket shut down, so
    the query fails at once with an OperationalError) and left broken: reconnect to go on."""
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        await _sever_and_settle(conn, task)
        raise
    if not done:
        await _sever_and_settle(conn, task)
        raise Unanswered(f"the database did not answer within {timeout:g}s")
    return task.result()


class BoundedSession:
    """One connection, opened with `connect` whenever there is none (or the last one was lost),
    on which every statement is bounded by `bound` seconds (see `bounded_query`). A statement
    that fails or runs out of time drops the connection: the next one starts on a new one."""

    def __init__(self, connect: Callable[[], Awaitable[AsyncConnection[Any]]], bound: float) -> None:
        self._connect = connect
        self._bound = bound
        self._conn: AsyncConnection[Any] | None = None

    async def query(self, statement: sql.SQL | sql.Composed, params: Params) -> list[tuple[Any, ...]]:
        """The statement's rows; raises what connecting or the statement raised (TimeoutError
        past the bound)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await self._connect()
        try:
            return await bounded_query(self._conn, statement, params, self._bound)
        except BaseException:
            await self.close()
            raise

    @property
    def backend_pid(self) -> int | None:
        """The server process of the connection open now (None: none is)."""
        return None if self._conn is None else self._conn.info.backend_pid

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        await close_quietly(conn)


async def _sever_and_settle(conn: AsyncConnection[Any], task: asyncio.Future[Any]) -> None:
    """Sever `conn` and let the query's task fail on it before anyone closes the connection
    (closed first, its socket would never wake the task)."""
    sever(conn)
    done, _ = await asyncio.wait({task}, timeout=1.0)
    if not done:  # (cannot happen with a socket shut down; never wait for it all the same)
        task.cancel()
    task.add_done_callback(lambda t: t.cancelled() or t.exception())


async def close_quietly(conn: AsyncConnection[Any] | None) -> None:
    """Close `conn` (if any) within a second, whatever state it is in: for connections that
    may be broken, where closing is tidying up, not something to wait or fail on."""
    if conn is None:
        return
    try:
        # (asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that
        # comes as the close completes, and a task being abandoned then ran on for ever.)
        async with asyncio.timeout(1):
            await conn.close()
    except (OSError, TimeoutError, psycopg.Error):
        pass


def sever(conn: AsyncConnection[Any]) -> None:
    """Shut the connection's socket down without a word to the server: whatever waits on it
    wakes with an error at once, and nothing waits for a network that stopped answering."""
    try:
        fd = conn.pgconn.socket
    except Exception:
        return  # (already closed)
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_PIN = "; ".join(f"SET {name} = '{value}'" for name, value in PINNED_SETTINGS)


async def start_session(conn: AsyncConnection[Any]) -> None:
    """Right after connecting: refuse a database the relay cannot serve (Unsupported), then pin
    the session settings. (One statement without parameters: psycopg sends it by the simple
    query protocol, which a replication connection also takes.)"""
    refuse_unusable(conn)
    await conn.execute(_PIN)


def refuse_unusable(conn: AsyncConnection[Any]) -> None:
    """Raise Unsupported, in one sentence, when the database cannot be served (SQL_ASCII)."""
    encoding = conn.info.parameter_status("server_encoding")
    if encoding == "SQL_ASCII":
        raise Unsupported(
            f"database {conn.info.dbname} has encoding SQL_ASCII, which stores bytes without saying"
            " which characters they are, so the relay cannot deliver its text as UTF-8; use a"
            " database with a real encoding (UTF8, or one PostgreSQL converts to UTF-8 such as"
            " LATIN1, WIN1252, EUC_JP)"
        )
