"""The config's shape: one model per section, with its defaults, bounds and descriptions (the
JSON schema is made of them), and the model narrowed to the connectors installed."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from outbox_relay.durations import Duration
from outbox_relay.identifiers import TableName
from outbox_relay.pgsession import Dsn
from outbox_relay.registry import ConnectorConfig, sink_plugins, source_plugins


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(StrictModel):
    """Exponential backoff with full jitter between attempts of one event."""

    initial: Duration = Field(default=0.1, gt=0, description="First backoff ceiling.")
    max: Duration = Field(default=30.0, gt=0, description="Largest backoff ceiling.")
    multiplier: float = Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description="Growth of the ceiling per attempt; more than 10 reaches max after an attempt or two.",
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetryConfig:
        if self.max < self.initial:
            raise ValueError("max must be >= initial")
        return self


class PipelineConfig(StrictModel):
    """How much the relay holds in memory and how it batches publishes."""

    max_in_flight: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Events held between fetch and source ack; bounds memory (a million events is"
        " gigabytes already).",
    )
    publish_batch_size: int = Field(default=1_000, ge=1, le=100_000, description="Events per sink call.")
    publish_concurrency: int = Field(default=2, ge=1, le=64, description="Sink calls at once.")
    per_aggregate_in_flight: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Consecutive events of one aggregate in one sink call, for sinks that keep a "
        "call's order (1 with on_poison: block): what a hot aggregate moves per broker round trip.",
    )
    stats_interval: Duration = Field(
        default=5.0,
        ge=0.1,
        description="How often pending and lag are measured (a query each time: at least 100ms, so an"
        " idle relay does not keep the database busy).",
    )


class DeadLetterConfig(StrictModel):
    """What happens to an event the broker keeps refusing (a poison event)."""

    after_attempts: int = Field(
        default=10,
        ge=1,
        le=1_000_000,  # (the count is stored in an integer column; `on_poison: block` never parks)
        description="Refusals by the broker before the event is parked; outages do not count.",
    )
    on_poison: Literal["dead_letter", "block"] = Field(
        default="dead_letter",
        description="dead_letter: park it and let its aggregate move on; block: keep retrying it, "
        "holding back the rest of its aggregate (order over progress).",
    )
    table: TableName = Field(
        default="outbox_relay_dead_letters",
        description="In the source's database; `init-db` creates it. name or schema.name as in SQL.",
    )
    dsn: Dsn | None = Field(default=None, description="Another database for it; default: the source's.")


class LeaseConfig(StrictModel):
    """One active relay per outbox among any number of replicas: a lease with a deadline, kept
    in a table of the source's database (see relay.leadership)."""

    enabled: bool = Field(default=True, description="Off only when a single relay runs, ever.")
    time: Duration = Field(
        default=5.0,
        ge=1.0,
        le=300.0,
        description="How long the lease lasts unless its holder renews it: a standby takes over a"
        " holder that stopped renewing (dead, frozen or cut off) within this time, and a holder"
        " that cannot renew stops publishing before it ends. 1s to 5m.",
    )
    check_interval: Duration = Field(
        default=1.0,
        ge=0.1,
        description="How often the active relay renews its lease (a query each time: at least"
        " 100ms, so an idle relay does not spin; at most a third of `time`, so that a renewal"
        " that fails can be retried before the lease ends).",
    )
    table: TableName = Field(
        default="outbox_relay_leases",
        description="The lease table, in the source's database; `init-db` creates it (and the"
        " relay does when it may). name or schema.name as in SQL.",
    )

    @model_validator(mode="after")
    def _renewals_fit_in_the_lease(self) -> LeaseConfig:
        if self.check_interval * 3 > self.time:
            raise ValueError(
                f"check_interval ({self.check_interval:g}s) must be at most a third of time"
                f" ({self.time:g}s): the holder must be able to retry a failed renewal before its"
                " lease ends"
            )
        return self


class OutboxConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    source: ConnectorConfig
    sink: ConnectorConfig
    retry: RetryConfig = RetryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    lease: LeaseConfig = LeaseConfig()

    def dead_letter_dsn(self) -> str | None:
        return self.dead_letter.dsn or self.source.database()

    @model_validator(mode="after")
    def _source_keeps_what_the_outbox_needs(self) -> OutboxConfig:
        """The lease and the dead-letter table live in the source's database: a source that
        declares none (`ConnectorConfig.database()`) runs without a lease, and with a dead-letter
        database of its own, or is refused here rather than silently running every replica
        active or holding poison events in memory."""
        if self.source.database() is not None:
            return self
        kind = self.source.type
        if self.lease.enabled:
            raise ValueError(
                f"lease.enabled: source type '{kind}' keeps no database to hold a lease in; set"
                " lease.enabled: false, and run one relay for this outbox only"
            )
        if self.dead_letter.dsn is None:
            raise ValueError(
                f"dead_letter.dsn: source type '{kind}' keeps no database; name one for the"
                " dead-letter table (poison events, and aggregates held with on_poison: block, wait"
                " there)"
            )
        return self


class HttpConfig(StrictModel):
    host: str = "0.0.0.0"
    port: int = Field(default=9400, ge=0, le=65535, description="0 turns the HTTP server off.")
    stuck_after: Duration = Field(
        default=120.0,
        ge=1.0,
        description="/healthz fails (503) once one call of an active outbox to its database, broker or"
        " dead-letter table has been out this long: a hung call, since each is bounded by its"
        " connector's own timeout. Keep it well above the sink's timeouts.",
    )


class LogConfig(StrictModel):
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON otherwise."
    )
    level: Literal["debug", "info", "warning", "error"] = "info"


class RelayConfig(StrictModel):
    outboxes: list[OutboxConfig] = Field(min_length=1)
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    shutdown_grace: Duration = Field(
        default=30.0, gt=0, description="How long SIGTERM waits for in-flight events."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> RelayConfig:
        seen: set[str] = set()
        for outbox in self.outboxes:
            if outbox.name in seen:
                raise ValueError(f"outbox name '{outbox.name}' is used twice")
            seen.add(outbox.name)
        return self


def _union(classes: Iterable[type[ConnectorConfig]]) -> Any:
    members = tuple(classes)
    if len(members) == 1:
        return members[0]
    return Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007 - dynamic union


@cache
def config_model() -> type[RelayConfig]:
    """RelayConfig with `source` and `sink` narrowed to the union of installed connector configs."""
    sources = _union(p.config for p in source_plugins().values())
    sinks = _union(p.config for p in sink_plugins().values())
    outbox = create_model("OutboxConfig", __base__=OutboxConfig, source=(sources, ...), sink=(sinks, ...))
    return create_model(
        "RelayConfig",
        __base__=RelayConfig,
        outboxes=(list[outbox], Field(min_length=1)),
    )


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of the config file (committed as config/relay.schema.json)."""
    schema = config_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "outbox-relay configuration"
    return schema
