"""What a source declares it can do, and what the relay asks of it by that declaration alone: a
database (where the lease and the dead-letter table live) and the database commands."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import pytest

from outbox_relay import registry
from outbox_relay.assembly import build_source
from outbox_relay.config import ConfigError, config_model, parse_config
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import BacklogStats, ConnectorError, DatabaseSource, Source, database_source
from outbox_relay.registry import ConnectorConfig, SourcePlugin
from outbox_relay.runner import database_setup
from outbox_relay.testing import MemorySource


class _QueueConfig(ConnectorConfig):
    """A plugin's source that reads a queue, not a PostgreSQL table: it keeps no database."""

    type: Literal["queue"] = "queue"


class _QueueSource(Source):
    kind = "queue"

    def __init__(self, _config: _QueueConfig) -> None:
        pass

    async def start(self) -> None: ...

    async def fetch(self, limit: int) -> list[OutboxEvent]:
        return []

    async def ack(self, events: Sequence[OutboxEvent]) -> None: ...

    async def wait_for_events(self) -> None: ...

    @property
    def caught_up(self) -> bool:
        return True

    async def backlog(self) -> BacklogStats:
        return BacklogStats(pending=0, oldest_age_seconds=0.0)


@pytest.fixture
def queue_source_installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    plugins = {**registry.source_plugins(), "queue": SourcePlugin("queue", _QueueConfig, _QueueSource)}
    for module in ("outbox_relay.registry", "outbox_relay.config.models", "outbox_relay.config.checks",
                   "outbox_relay.config.messages", "outbox_relay.assembly"):  # fmt: skip
        monkeypatch.setattr(f"{module}.source_plugins", lambda: plugins)
    config_model.cache_clear()
    yield
    config_model.cache_clear()


def _outbox(**extra: object) -> dict[str, object]:
    return {"name": "jobs", "source": {"type": "queue"}, "sink": {"type": "stdout"}, **extra}


def _problems(*outboxes: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"outboxes": list(outboxes)}, "relay.yaml", {})
    return caught.value.problems


@pytest.mark.usefixtures("queue_source_installed")
def test_a_source_without_a_database_is_refused_a_lease_naming_the_key_and_the_way_out() -> None:
    (problem,) = _problems(_outbox())
    assert problem.startswith("relay.yaml: outboxes[0]")
    assert "lease.enabled: source type 'queue' keeps no database to hold a lease in" in problem
    assert "lease.enabled: false" in problem


@pytest.mark.usefixtures("queue_source_installed")
def test_without_a_lease_it_still_needs_a_database_for_its_dead_letters() -> None:
    (problem,) = _problems(_outbox(lease={"enabled": False}))
    assert "dead_letter.dsn: source type 'queue' keeps no database" in problem


@pytest.mark.usefixtures("queue_source_installed")
def test_with_no_lease_and_a_dead_letter_database_it_is_accepted_and_relayed_without_database_commands() -> (
    None
):
    config = parse_config(
        {"outboxes": [_outbox(lease={"enabled": False}, dead_letter={"dsn": "postgresql://u@db/dl"})]},
        "relay.yaml",
        {},
    )
    outbox = config.outboxes[0]
    assert outbox.source.database() is None
    assert outbox.dead_letter_dsn() == "postgresql://u@db/dl"
    source = build_source(outbox, 0)
    assert not isinstance(source, DatabaseSource)
    with pytest.raises(ConnectorError, match="source type queue keeps no database, so it cannot set up"):
        database_setup(outbox, source)


def test_the_postgresql_sources_declare_their_database_and_the_database_commands() -> None:
    for source in ({"type": "postgres-polling"}, {"type": "postgres-logical", "slot": "s"}):
        outbox = {
            "name": "o",
            "source": {**source, "dsn": "postgresql://u@db/app"},
            "sink": {"type": "stdout"},
        }
        parsed = parse_config({"outboxes": [outbox]}, "relay.yaml", {}).outboxes[0]
        assert parsed.source.database() == "postgresql://u@db/app"
        assert isinstance(build_source(parsed, 0), DatabaseSource)


def test_the_in_memory_source_is_a_source_and_nothing_more() -> None:
    source = MemorySource()
    assert not isinstance(source, DatabaseSource)
    with pytest.raises(ConnectorError, match="cannot replay events"):
        database_source(source, "replay events")
