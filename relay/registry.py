"""Finds sources and sinks by their `type:` through Python entry points.

A connector module exposes `plugin = SinkPlugin(...)` or `SourcePlugin(...)` and is registered
under the entry-point group `outbox_relay.sinks` or `outbox_relay.sources`; a third-party package
adds a broker the same way. Connector modules import their client library lazily (inside
`factory`), so config validation works without the extra installed and `requires` gives the user
the exact `pip install` line.
"""

from __future__ import annotations

import builtins
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from outbox_relay.interfaces import DeliveryReader, Sink, Source

SINK_GROUP = "outbox_relay.sinks"
SOURCE_GROUP = "outbox_relay.sources"


class ConnectorConfig(BaseModel):
    """Base of every connector's settings: unknown keys are refused, `type` selects the plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str

    def database(self) -> str | None:
        """A source's declared capability: the PostgreSQL database (a DSN) its outbox is kept
        in, which also holds the outbox's lease and, unless `dead_letter.dsn` names another, its
        dead-letter table. None for a source that keeps none: the config then refuses
        `lease.enabled` and needs `dead_letter.dsn` (see relay.config)."""
        return None

    def lease_scope(self) -> str:
        """What this source reads, for the lease key (see relay.leadership): a table, a slot."""
        return ""

    def lease_resolves(self) -> str | None:
        """A table whose name the server resolves for the lease's key, so that spellings and
        search_paths that find the same table share one lease (see relay.leadership)."""
        return None

    def claims(self) -> list[Claim]:
        """What this source reads that no other outbox may read (a table, a slot, a
        publication), as far as the config alone tells; see `Claim`."""
        return []


@dataclass(frozen=True, slots=True)
class Claim:
    """Something one outbox alone may read: two outboxes polling one table race for its rows
    (each sink gets part of the events); a table both polled and replicated, or one slot or
    publication streamed by two outboxes, delivers events twice or not at all."""

    kind: str
    #: Where it lives, as the config says: for a table or publication the database (host,
    #: port, database name), for a replication slot the server (slots belong to the cluster).
    place: str
    #: The schema of a table; None when unqualified (found through the search_path).
    schema: str | None
    #: The name as the server reads it (folded or unquoted).
    name: str
    #: The config key it comes from, relative to the connector: `table`, `tables[1]`, `slot`.
    key: str
    #: How to show it in a message.
    shown: str


C = TypeVar("C", Source, Sink)


@dataclass(frozen=True)
class Plugin(Generic[C]):
    type: str
    config: builtins.type[ConnectorConfig]
    factory: Callable[..., C]
    #: Importable module names the connector needs, and the extra that installs them.
    requires: tuple[str, ...] = field(default=())
    extra: str | None = None
    #: For sinks: how `drill` reads back what was delivered (None: the sink cannot be drilled).
    reader: Callable[..., DeliveryReader] | None = None
    #: Checks that need the client library but no network (a client's own settings), run by
    #: every command when the config is loaded: (key relative to the connector, reason) pairs.
    validate: Callable[[Any], Sequence[tuple[str, str]]] | None = None

    def missing_requirement(self) -> str | None:
        """The `pip install` hint when a required client library is not importable."""
        missing = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if not missing:
            return None
        return f"needs: pip install 'outbox-relay[{self.extra}]' (missing {', '.join(missing)})"


SinkPlugin = Plugin[Sink]
SourcePlugin = Plugin[Source]


#: Entry points that failed to load, by type name: a broken third-party plugin must not take the
#: whole relay down, but a config that names it gets the reason instead of "unknown type".
broken_plugins: dict[str, str] = {}


def _load(group: str) -> dict[str, Plugin[Sink] | Plugin[Source]]:
    plugins: dict[str, Plugin[Sink] | Plugin[Source]] = {}
    for entry in entry_points(group=group):
        try:
            plugin = entry.load()
        except Exception as exc:
            broken_plugins[entry.name] = f"{entry.value} failed to load: {type(exc).__name__}: {exc}"
            continue
        if not isinstance(plugin, Plugin):
            broken_plugins[entry.name] = f"{entry.value} is not a relay.registry.Plugin"
            continue
        plugins[plugin.type] = plugin
    return plugins


@cache
def sink_plugins() -> dict[str, Plugin[Sink]]:
    return _load(SINK_GROUP)  # type: ignore[return-value]


@cache
def source_plugins() -> dict[str, Plugin[Source]]:
    return _load(SOURCE_GROUP)  # type: ignore[return-value]
