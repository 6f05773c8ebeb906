"""The database's side of the relay: `outbox-relay init-db` sets it up, `outbox-relay status`
says what waits in it."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import click

from outbox_relay.assembly import SetupError, build_dead_letter_store, build_source
from outbox_relay.cli.common import CONFIG_OPTION, database_error, fail, load, one_line, run_async
from outbox_relay.config import OutboxConfig
from outbox_relay.interfaces import ConnectorError, DatabaseSource, Source
from outbox_relay.leadership import lease_line
from outbox_relay.logs import configure_logging
from outbox_relay.runner import database_setup, set_up_database
from outbox_relay.secrets import scrubber


@click.command("init-db")
@CONFIG_OPTION
@click.option("--print-sql", is_flag=True, help="Print the SQL instead of running it.")
def init_db(config_path: Path, print_sql: bool) -> None:
    """Create the outbox table, its partial index and the NOTIFY trigger (idempotent).

    A table with a columns mapping is the application's: init-db sets up what the relay needs
    around it but does not create it (--print-sql shows a CREATE TABLE for it)."""
    config = load(config_path)
    for index, outbox in enumerate(config.outboxes):
        try:
            source = build_source(outbox, index)
        except SetupError as exc:
            fail(f"{config_path}: {exc}")
        if not isinstance(source, DatabaseSource) or outbox.source.database() is None:
            fail(f"{config_path}: outboxes[{index}].source: this source has no database to set up")
        if print_sql:
            _print_sql(outbox, source)
            continue
        try:
            notes = run_async(lambda o=outbox, s=source: set_up_database(o, s))  # type: ignore[misc]
        except Exception as exc:
            fail(f"{config_path}: outboxes[{index}]: init-db failed: {one_line(exc)}", code=1)
        for note in notes:
            click.echo(f"outbox {outbox.name}: {note}")
        click.echo(f"outbox {outbox.name}: database ready")


def _print_sql(outbox: OutboxConfig, source: Source) -> None:
    statements, elsewhere = database_setup(outbox, source)
    click.echo(f"-- outbox {outbox.name}")
    click.echo(";\n\n".join(s.as_string() for s in statements) + ";\n")
    for _, other in elsewhere:
        click.echo(f"-- outbox {outbox.name}: in the dead-letter database")
        click.echo(";\n\n".join(s.as_string() for s in other) + ";\n")


@click.command()
@CONFIG_OPTION
def status(config_path: Path) -> None:
    """Per outbox: pending events, age of the oldest, published in the last minute."""
    config = load(config_path)
    configure_logging("console", "error")

    async def main() -> int:
        failures = 0
        for index, outbox in enumerate(config.outboxes):
            if not await _print_status(outbox, index):
                failures += 1
        return 1 if failures else 0

    try:
        sys.exit(run_async(main))
    except SetupError as exc:
        fail(f"{config_path}: {exc}")


class _Unavailable(Exception):
    """A part of an outbox's status that could not say (its line says why); status exits 1."""


async def _print_status(outbox: OutboxConfig, index: int) -> bool:
    """Print an outbox's status lines; False when its database could not say."""
    source = build_source(outbox, index)
    healthy = True
    try:
        # No start(): status must not open a replication stream or take over anything.
        # (Each part printed as soon as it is known: a later one failing keeps the earlier.)
        for part in (
            partial(_source_lines, source),
            partial(_parked_lines, outbox, index),
            partial(_lease_lines, outbox),
        ):
            try:
                lines = await part()
            except _Unavailable as exc:  # (the next parts may still say something)
                lines, healthy = [str(exc)], False
            for line in lines:
                click.echo(scrubber.scrub(f"{outbox.name}: {line}"))
    except (ConnectorError, OSError) as exc:
        click.echo(scrubber.scrub(f"{outbox.name}: unavailable: {exc}"))
        return False
    except Exception as exc:
        click.echo(scrubber.scrub(f"{outbox.name}: unavailable: {type(exc).__name__}: {exc}"))
        return False
    finally:
        await source.close()
    return healthy


async def _source_lines(source: Source) -> list[str]:
    """What the source says of itself; for a source without a database, its backlog."""
    if isinstance(source, DatabaseSource):
        return await source.status_lines()
    stats = await source.backlog()
    return [f"pending={stats.pending} oldest_age={stats.oldest_age_seconds:.1f}s"]


async def _lease_lines(outbox: OutboxConfig) -> list[str]:
    dsn = outbox.source.database()
    if not outbox.lease.enabled or dsn is None:
        return []
    return [
        await lease_line(
            dsn,
            outbox.name,
            outbox.lease.table,
            outbox.source.lease_scope(),
            outbox.source.lease_resolves(),
        )
    ]


async def _parked_lines(outbox: OutboxConfig, index: int) -> list[str]:
    """What waits in the dead-letter table: dead-lettered events, and held ones (in order behind
    the first event of their aggregate) with how many aggregates they hold back."""
    store = build_dead_letter_store(outbox, index)
    try:
        dead, held = await store.count(outbox.name), await store.count(outbox.name, "held")
        aggregates = len(await store.held_aggregates(outbox.name)) if held else 0
    except Exception as exc:  # (a missing table says nothing about the outbox itself)
        raise _Unavailable(f"dead letters unavailable: {database_error(exc)}") from None
    finally:
        await store.close()
    return [f"dead_letters={dead} held={held} held_aggregates={aggregates}"]
