"""What a config means beyond its shape, checked without any network: each connector's own
verdict on its settings, and no two outboxes reading one table, slot or publication."""

from __future__ import annotations

from outbox_relay.config.errors import ConfigError, join_key
from outbox_relay.config.models import RelayConfig
from outbox_relay.registry import Claim, sink_plugins, source_plugins


def check_offline(config: RelayConfig, file: str = "relay.yaml") -> None:
    """What a config means beyond its shape, checked without any network: each connector's own
    `validate` hook (a client library's verdict on its settings), and no two outboxes reading
    one table, replication slot or publication. Raises ConfigError."""
    problems: list[str] = []
    for index, outbox in enumerate(config.outboxes):
        ends = (("source", outbox.source, source_plugins()), ("sink", outbox.sink, sink_plugins()))
        for role, connector, plugins in ends:
            plugin = plugins.get(connector.type)
            if plugin is None or plugin.validate is None or plugin.missing_requirement() is not None:
                continue  # (building the connector says which extra to install)
            for key, reason in plugin.validate(connector):
                where = f"outboxes[{index}].{role}"
                problems.append(f"{file}: {join_key(where, key) if key else where}: {reason}")
    problems += [f"{file}: {problem}" for problem in shared_reads(config)]
    if problems:
        raise ConfigError(problems)


def shared_reads(config: RelayConfig) -> list[str]:
    """Two outboxes that read one table, slot or publication, as far as the config says: the
    same name in the same database (an unqualified table name matches any schema's)."""
    problems: list[str] = []
    seen: list[tuple[int, Claim]] = []
    for index, outbox in enumerate(config.outboxes):
        for claim in outbox.source.claims():
            for other_index, other in seen:
                if other_index == index or not _same_place(claim, other):
                    continue
                problems.append(shared_problem(config, index, claim, other_index, other))
                break
            seen.append((index, claim))
    return problems


def _same_place(a: Claim, b: Claim) -> bool:
    if a.kind != b.kind or a.place != b.place or a.name != b.name:
        return False
    return a.schema == b.schema or a.schema is None or b.schema is None


_WHY_ALONE = {
    "table": "two outboxes on one table race for its events, and each sink gets only some of them",
    "replication slot": "a slot streams to one reader at a time, and confirms what either one acknowledged",
    "publication": "both outboxes would publish every event it sends",
}


def shared_problem(config: RelayConfig, index: int, claim: Claim, other_index: int, other: Claim) -> str:
    """The sentence refusing `claim` of outbox `index`, which outbox `other_index` reads too."""
    first = config.outboxes[other_index].name
    where = f"outboxes[{index}].source.{claim.key}"
    text = (
        f"{where}: {claim.kind} {claim.shown} is also read by outbox '{first}'"
        f" (outboxes[{other_index}].source.{other.key}: {other.shown}); {_WHY_ALONE.get(claim.kind, '')}."
        f" Give each outbox its own {claim.kind}, or relay it from one outbox"
    )
    if claim.schema != other.schema:
        text += (
            " (an unqualified table name is found through the search_path and may be the same table;"
            " if they differ, write each with its schema)"
        )
    return text
