"""The two narrow interfaces every connector implements: Source and Sink.

Data flows one way: source -> pipeline -> sink, and acknowledgements flow back to the source.
Connectors know nothing about each other; the pipeline owns batching, ordering and retries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg import AsyncConnection, sql

from outbox_relay.events import OutboxEvent, PublishResult


class ConnectorError(Exception):
    """A failure a connector explains in one sentence (no traceback is shown to the user)."""


class Unsupported(ConnectorError):
    """A database (or a setting of it) the relay cannot serve, however often it tries (a
    SQL_ASCII database, say): `run` stops with this one sentence instead of retrying, and
    `check --connect` reports it."""


class Fenced(ConnectorError):
    """The lease term this process acted under has ended: nothing was recorded, and another
    replica may be active (see `Fence`)."""


class Fence(Protocol):
    """The lease term a relay acts under (relay.leadership.Term): valid until its deadline,
    identified in the lease table (`table`, row `key`) by its fencing token, which grows with
    every new holder."""

    table: str
    key: str
    token: int

    def valid(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class BacklogStats:
    """What is waiting in a source. `oldest_age_seconds` is 0 when nothing waits;
    `slot_lag_bytes` is WAL retained for a replication slot (None for sources without one)."""

    pending: int
    oldest_age_seconds: float
    slot_lag_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SinkFeatures:
    """What a sink promises beyond the contract every sink keeps (see `Sink`), declared the way
    Watermill's publishers declare theirs: the pipeline and the contract suite
    (outbox_relay.testing.sink_contract) read the declaration instead of knowing sinks by name.

    - `keeps_order`: a call may carry several consecutive events of one aggregate, and the sink
      hands them to the broker in that order over one ordered path. Without it, a call carries at
      most one event per aggregate (`one_per_aggregate_per_call`), and the sink may publish a
      call's events concurrently, in any interleaving.
    - `dedupes_by_id`: the broker stores a repeat of an `event_id` it already stored (within its
      deduplication window) only once, and acknowledges it again: a re-sent event reaches
      consumers once. Without it, every acknowledged publication is stored, repeats included.
    """

    keeps_order: bool = False
    dedupes_by_id: bool = False

    @property
    def one_per_aggregate_per_call(self) -> bool:
        """Whether the pipeline must hand this sink at most one event per aggregate per call."""
        return not self.keeps_order


class Sink(ABC):
    """Publishes events to a broker.

    Contract:
    - `publish(events)` returns exactly one result per event, in the given order: None means the
      broker acknowledged the event durably (Kafka delivery report with acks=all, RabbitMQ
      publisher confirm, JetStream PubAck, file written and flushed); a `Failure` means it did not.
    - `publish` is called concurrently, from one event loop: up to `pipeline.publish_concurrency`
      calls at once, plus those releasing held events; a sink shares its connections among them.
    - The pipeline never hands out the next events of an aggregate before the previous ones were
      acknowledged, so no two concurrent calls hold events of one aggregate. Unless the sink
      declares `features.keeps_order`, a call holds at most one event per aggregate, so the sink
      may publish a call's events concurrently and in any interleaving.
    - A sink with `features.keeps_order` may get several consecutive events of one aggregate in one
      call, in order, and must hand them to the broker in that order over one ordered path (one
      channel, one connection, one partition through an idempotent producer), so that the broker
      stores them in that order. Results stay per event: when an earlier one fails, the pipeline
      re-sends the later ones of its aggregate after it, whatever their results.
    - Raising from `publish` means the whole call failed (for example the broker is unreachable);
      the pipeline treats every event of the call as failed and retries them. A sink raises
      ConnectorError (or lets an OSError through) for that; anything else is a bug in the sink,
      which the contract suite reports as one.
    - Results are also what readiness (`/readyz`) and `outbox_relay_up{component="sink"}` are made
      of: the broker is up after a call in which it took an event (None) or answered about one
      (a `Failure` that is not `transient`: a refusal, permanent or not, is an answer), and down
      after a call that raised or whose every result is `transient`. So a `Failure` is transient
      exactly when the broker as a whole did not answer (no acknowledgement in time, a connection
      lost or refused, the broker saying "try again later"), never for an event's own fault.
    - `publish` returns (or raises) within a bound set by the sink's own configuration (its
      acknowledgement, request or socket timeout), also when the broker accepts connections and
      never answers: a hung call would hold readiness and its events forever.
    - There is no separate reconnection probe: the events a down broker did not take stay first
      in their aggregates and are retried with backoff (`retry.max` apart at most), and the first
      one it takes marks it up again. A relay with nothing to publish has nothing that failed,
      so it is never left down while idle.
    - `close()` flushes whatever was accepted and releases the connection.
    - Under a lease (`fence`), nothing is sent once `may_send()` is false (see there).

    The contract suite (outbox_relay.testing.sink_contract) checks each of these against the
    sink's real server, an outage included; a plugin's author runs it with one fixture.
    """

    #: Label for metrics and logs, normally the connector type.
    kind: str = "sink"
    #: What the sink promises beyond the contract (see `SinkFeatures`); set per class, or per
    #: instance when it depends on the settings.
    features: SinkFeatures = SinkFeatures()
    #: The lease term the relay publishes under, set by the pipeline (None: no lease).
    fence: Fence | None = None

    @property
    def keeps_order(self) -> bool:
        """Whether a call's events reach the broker in the order given: `features.keeps_order`."""
        return self.features.keeps_order

    def may_send(self) -> bool:
        """Whether the relay may still send now. The pipeline asks before every call; a sink
        that sends a call's events in several steps, awaiting in between (one request per
        event, chunks that yield to the event loop), asks before each step too, and reports
        what it did not send as a transient Failure: a relay that froze in the middle of a call
        and woke after its lease ended must send nothing more."""
        return self.fence is None or self.fence.valid()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect. May raise ConnectorError; the pipeline retries with backoff."""

    @abstractmethod
    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and disconnect."""

    async def discard(self) -> None:
        """Instead of `close`, when the relay lost its lease: drop, without sending, whatever was
        handed over and is not sent yet (the new holder sends it; sent now, it would reach the
        broker after newer events), then disconnect. By default `close`: a sink that sends
        within `publish` has nothing left to send."""
        await self.close()

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Raise ConnectorError when the broker cannot be reached (used by `check --connect`, `/readyz`)."""

    def describe(self) -> dict[str, object]:
        """Effective settings for `check` output, secrets already redacted."""
        return {}


class Source(ABC):
    """Yields outbox events in source order and takes acknowledgements back.

    Contract:
    - `fetch(limit)` returns at most `limit` events that were never returned before by this
      instance, in source order (position order for polling, commit order for replication).
      Every unacknowledged event is returned once per process lifetime; after a restart, whatever
      was not acknowledged is returned again (at-least-once).
    - `ack(events)` records that the broker acknowledged these events (mark published, delete, or
      confirm a WAL position). It is durable when it returns, or, for a source that can confirm
      only past a whole unit (logical replication confirms the end of a transaction whose events
      and every earlier ones were all acknowledged), once `unconfirmed` no longer counts them.
      Events may be acked in any order across aggregates. Raising means nothing was recorded and
      the pipeline retries the same ack.
    - `wait_for_events()` returns when new events may have arrived (NOTIFY, WAL) or when the
      source's poll interval has passed, whichever is first.
    - `caught_up` is true when the last `fetch` saw everything committed so far (for `--drain`).
    """

    kind: str = "source"

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def fetch(self, limit: int) -> list[OutboxEvent]: ...

    @abstractmethod
    async def ack(self, events: Sequence[OutboxEvent]) -> None: ...

    @abstractmethod
    async def wait_for_events(self) -> None: ...

    @property
    @abstractmethod
    def caught_up(self) -> bool: ...

    @property
    def unconfirmed(self) -> int:
        """Events handed out whose acknowledgement is not durable yet, acknowledged or not: a
        crash now would deliver them again. The pipeline keeps this within its in-flight window
        (a source that can confirm only in units, such as a transaction, may exceed it by one
        unit). 0 for sources whose `ack` is durable when it returns."""
        return 0

    @abstractmethod
    async def backlog(self) -> BacklogStats: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def fence_with(self, fence: Fence) -> None:  # noqa: B027 - optional hook
        """Called before `start` when the relay runs under a lease. From then on `ack` records
        nothing unless `fence.valid()` (it raises Fenced instead), and a source whose ack is a
        statement in the lease's database makes it conditional on `fence.token` in that same
        statement. By default nothing: the pipeline checks the fence before every `ack` too."""


class DatabaseSource(ABC):
    """A declared capability, beside `Source`: a source that reads an outbox kept in a
    PostgreSQL database it can administer. The relay's commands that work on that database ask
    for it (`isinstance`), never probe for attributes: `init-db` (`init_sql`, `init_db`),
    `status` (`status_lines`), `check --connect` (`check`), `dlq replay` (`replay`) and the
    drill's writer (`write`). Its config names the database (`ConnectorConfig.database()`), which
    is also where the outbox's lease and, by default, its dead-letter table live.
    A source without it is relayed all the same; those commands say it cannot serve them.
    """

    @abstractmethod
    async def check(self) -> list[str]:
        """Verify the database side (reachable, table and columns present); return notes to print."""

    @abstractmethod
    async def write(self, events: Sequence[OutboxEvent]) -> None:
        """Write events into the outbox in one transaction, as an application would (for drills)."""

    @abstractmethod
    async def replay(self, event: OutboxEvent) -> str:
        """Put a dead-lettered event back in front of the relay, once; return what was done."""

    @abstractmethod
    def init_sql(self) -> list[sql.Composed]:
        """The idempotent statements that set up a fresh database (table, index, trigger), each
        run alone in autocommit, in order; `init-db --print-sql` prints them. Composed with
        `psycopg.sql`: no name from the config is ever put into SQL text as it is."""

    async def init_db(self, conn: AsyncConnection[Any]) -> list[str]:
        """What `init-db` does in the source's database over `conn` (autocommit): by default,
        run `init_sql()`. A source whose setup depends on what the database already holds (an
        existing publication) overrides it. Returns notes for the operator; raises
        ConnectorError when the database holds something that contradicts the config."""
        for statement in self.init_sql():
            await conn.execute(statement)
        return []

    @abstractmethod
    async def status_lines(self) -> list[str]:
        """Human-readable lines for `outbox-relay status`."""


def database_source(source: Source, purpose: str) -> DatabaseSource:
    """`source` as the `DatabaseSource` it declares itself to be, for `purpose` (what a command
    wants to do); ConnectorError naming the source's type when it does not."""
    if isinstance(source, DatabaseSource):
        return source
    raise ConnectorError(f"source type {source.kind} keeps no database, so it cannot {purpose}")


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message as an independent consumer saw it: its headers and when it was received."""

    headers: dict[str, str]
    received_at: float


class DeliveryReader(ABC):
    """Reads back, independently of the relay, what a sink delivered (used by `drill`).

    Contract: `start(fields)` prepares to read every destination the sink renders for these
    template fields (topics, queues, files), from now on or from the beginning, whichever the
    broker allows; messages that were not written by the caller may be returned too (the caller
    filters). `poll()` returns what arrived since the last call, each destination in delivery
    order (a Kafka partition's offsets, a queue's order, a file's lines).
    """

    @abstractmethod
    async def start(self, fields: Sequence[dict[str, str]]) -> None: ...

    @abstractmethod
    async def poll(self) -> list[Delivered]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and anything `start` created (a temporary queue)."""
