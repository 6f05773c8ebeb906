"""Builds an outbox's parts from its config: its source and sink (from their plugins), its
dead-letter store, and the pipeline that joins them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from outbox_relay.config import OutboxConfig, RelayConfig
from outbox_relay.deadletters import DeadLetterStore
from outbox_relay.interfaces import ConnectorError, Sink, Source
from outbox_relay.pipeline import Pipeline
from outbox_relay.registry import ConnectorConfig, sink_plugins, source_plugins


class SetupError(Exception):
    """A config that validated but cannot be used (missing extra, connector refuses settings)."""


def build_source(outbox: OutboxConfig, index: int) -> Source:
    return cast(Source, _build("source", source_plugins(), outbox.source, index))


def build_sink(outbox: OutboxConfig, index: int) -> Sink:
    return cast(Sink, _build("sink", sink_plugins(), outbox.sink, index))


def _build(role: str, plugins: Mapping[str, object], config: ConnectorConfig, index: int) -> object:
    from outbox_relay.registry import Plugin

    plugin = plugins[config.type]
    assert isinstance(plugin, Plugin)
    where = f"outboxes[{index}].{role}"
    missing = plugin.missing_requirement()
    if missing:
        raise SetupError(f"{where}.type: {role} type '{config.type}' {missing}")
    try:
        return plugin.factory(config)
    except ConnectorError as exc:
        raise SetupError(f"{where}: {exc}") from None


def build_dead_letter_store(outbox: OutboxConfig, index: int) -> DeadLetterStore:
    """The dead-letter store, also where `on_poison: block` keeps held aggregates. Every outbox
    has one: held in memory instead, the events behind a poison one would fill the in-flight
    window and hold back every other aggregate."""
    dsn = outbox.dead_letter_dsn()
    if dsn is None:
        raise SetupError(
            f"outboxes[{index}].dead_letter.dsn: this source has no database; name one for the "
            "dead-letter table (poison events, and aggregates held with on_poison: block, wait there)"
        )
    return DeadLetterStore(dsn, outbox.dead_letter.table)


def build_pipeline(outbox: OutboxConfig, index: int, sink: Sink | None = None) -> Pipeline:
    """The outbox's pipeline, with its configured sink unless `sink` is given (tools, tests)."""
    return Pipeline(
        outbox.name,
        build_source(outbox, index),
        sink if sink is not None else build_sink(outbox, index),
        retry=outbox.retry,
        tuning=outbox.pipeline,
        dead_letter=outbox.dead_letter,
        dead_letters=build_dead_letter_store(outbox, index),
    )


def build_pipelines(config: RelayConfig) -> list[Pipeline]:
    return [build_pipeline(outbox, i) for i, outbox in enumerate(config.outboxes)]
