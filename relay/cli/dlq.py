"""`outbox-relay dlq`: see, replay and purge dead-lettered (and held) events."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from outbox_relay.assembly import SetupError, build_source
from outbox_relay.cli.common import (
    CONFIG_OPTION,
    OUTBOX_OPTION,
    database_error,
    fail,
    load,
    masked,
    run_async,
)
from outbox_relay.config import RelayConfig
from outbox_relay.deadletters import DeadLetter, DeadLetterStore
from outbox_relay.deadletters import as_event as as_dead_letter_event
from outbox_relay.interfaces import ConnectorError, Source, database_source
from outbox_relay.logs import configure_logging, get_logger
from outbox_relay.secrets import scrubber


@click.group()
def dlq() -> None:
    """See, replay and purge dead-lettered events."""


EVENT_OPTION = click.option("--event-id", "event_ids", multiple=True, help="Only these events (repeatable).")


def _dead_letter_targets(config: RelayConfig, outbox_name: str | None) -> list[tuple[int, Any]]:
    targets = [
        (i, o)
        for i, o in enumerate(config.outboxes)
        if (outbox_name is None or o.name == outbox_name) and o.dead_letter_dsn() is not None
    ]
    if outbox_name is not None and not targets:
        fail(f"no outbox named {outbox_name} with a dead-letter table in this config")
    return targets


def _store(outbox: Any) -> DeadLetterStore:
    return DeadLetterStore(outbox.dead_letter_dsn(), outbox.dead_letter.table)


_LIST_FIELD = 200  # characters of one field on a `dlq list` line


def _listed(value: object) -> str:
    """A field of a `dlq list` line: cut to a screen's worth (`dlq show` has it all), masked (a
    row stored by an older version may hold a secret)."""
    text = str(value)
    # Masked first (a long value only as far as it could be shown), then cut: a cut after
    # masking cannot reveal part of a secret.
    shown = scrubber.scrub_shortened(text, _LIST_FIELD * 20)
    return shown if len(shown) <= _LIST_FIELD else f"{shown[:_LIST_FIELD]}... [{len(text)} characters, cut]"


@dlq.command("list")
@CONFIG_OPTION
@OUTBOX_OPTION
@click.option("--all", "include_replayed", is_flag=True, help="Include events replayed already.")
def dlq_list(config_path: Path, outbox_name: str | None, include_replayed: bool) -> None:
    """One line per parked event: outbox, event id, aggregate, state (dead, or held in order
    behind the first event of its aggregate), attempts, error."""
    config = load(config_path)

    async def main() -> None:
        for _, outbox in _dead_letter_targets(config, outbox_name):
            store = _store(outbox)
            try:
                for letter in await store.entries(outbox.name, include_replayed=include_replayed):
                    replayed = (
                        f" replayed={letter.replayed_at:%Y-%m-%dT%H:%M:%SZ}" if letter.replayed_at else ""
                    )

                    cut = _listed
                    click.echo(
                        f"{cut(letter.outbox)} {cut(letter.event_id)}"
                        f" {cut(letter.aggregate_type)}/{cut(letter.aggregate_id)}"
                        f" {cut(letter.event_type)} state={letter.state} attempts={letter.attempts}"
                        f" refusals={letter.refusals}/{outbox.dead_letter.after_attempts}"
                        f" last_failed={letter.last_failed_at:%Y-%m-%dT%H:%M:%SZ}{replayed}"
                        f" error={cut(letter.error)}"
                    )
            finally:
                await store.close()

    _run_dlq(main)


@dlq.command("show")
@CONFIG_OPTION
@OUTBOX_OPTION
@EVENT_OPTION
def dlq_show(config_path: Path, outbox_name: str | None, event_ids: tuple[str, ...]) -> None:
    """Everything stored about dead-lettered events, payload included, as JSON lines."""
    config = load(config_path)

    found: set[str] = set()

    async def main() -> None:
        for _, outbox in _dead_letter_targets(config, outbox_name):
            store = _store(outbox)
            try:
                for letter in await store.entries(outbox.name, event_ids):
                    found.add(letter.event_id)
                    shown = dataclasses.asdict(letter)
                    shown["payload"] = letter.payload.decode("utf-8", "replace")
                    # Each text masked before JSON escapes it (a stored row may hold a secret).
                    click.echo(json.dumps(masked(shown), default=str, sort_keys=True))
            finally:
                await store.close()

    _run_dlq(main)
    _fail_on_unknown(event_ids, found, outbox_name)


def _fail_on_unknown(event_ids: tuple[str, ...], found: set[str], outbox_name: str | None) -> None:
    """Exit 1 naming each event asked for by id that no dead-letter table holds."""
    where = f"outbox {outbox_name}'s dead-letter table" if outbox_name else "any dead-letter table"
    unknown = [event_id for event_id in dict.fromkeys(event_ids) if event_id not in found]
    if unknown:
        fail([f"no such event in {where}: {event_id}" for event_id in unknown], code=1)


@dlq.command("replay")
@CONFIG_OPTION
@OUTBOX_OPTION
@EVENT_OPTION
@click.option("--all", "replay_all", is_flag=True, help="Every event not replayed yet.")
def dlq_replay(
    config_path: Path, outbox_name: str | None, event_ids: tuple[str, ...], replay_all: bool
) -> None:
    """Put dead-lettered events back in front of the relay, once each."""
    if not event_ids and not replay_all:
        fail("name the events with --event-id (repeatable), or pass --all")
    config = load(config_path)
    configure_logging(config.log.format, "info")
    found: set[str] = set()

    async def main() -> None:
        for index, outbox in _dead_letter_targets(config, outbox_name):
            store, source = _store(outbox), build_source(outbox, index)
            try:
                for letter in await store.entries(outbox.name, event_ids, include_replayed=bool(event_ids)):
                    found.add(letter.event_id)
                    done = await _replay(outbox.name, letter, store, source)
                    click.echo(f"{outbox.name} {letter.event_id}: {done}")
            finally:
                await store.close()
                await source.close()

    _run_dlq(main)
    _fail_on_unknown(event_ids, found, outbox_name)


@dlq.command("purge")
@CONFIG_OPTION
@OUTBOX_OPTION
@EVENT_OPTION
@click.option("--replayed", "replayed_only", is_flag=True, help="Only events replayed already.")
@click.option("--all", "purge_all", is_flag=True, help="Every dead-lettered event of the outbox(es).")
def dlq_purge(
    config_path: Path,
    outbox_name: str | None,
    event_ids: tuple[str, ...],
    replayed_only: bool,
    purge_all: bool,
) -> None:
    """Delete dead-lettered events for good."""
    if not (event_ids or replayed_only or purge_all):
        fail("name the events with --event-id, or pass --replayed or --all")
    config = load(config_path)
    found: set[str] = set()

    async def main() -> None:
        for _, outbox in _dead_letter_targets(config, outbox_name):
            store = _store(outbox)
            try:
                removed = await store.purge(outbox.name, event_ids, replayed_only)
                found.update(removed)
                click.echo(f"{outbox.name}: {len(removed)} dead letters purged")
            finally:
                await store.close()

    _run_dlq(main)
    _fail_on_unknown(event_ids, found, outbox_name)


async def _replay(outbox: str, letter: DeadLetter, store: DeadLetterStore, source: Source) -> str:
    """Put one dead letter back in front of the relay unless it was replayed already or is held;
    what was done, as the line's text."""
    if letter.replayed_at is not None:
        return f"replayed already at {letter.replayed_at:%Y-%m-%dT%H:%M:%SZ}, not replayed again"
    if letter.state == "held":
        return (
            "held, not replayed: the relay publishes held events in order once the first one of"
            " their aggregate goes through (purge that one to skip it)"
        )
    done = await database_source(source, "replay events").replay(as_dead_letter_event(letter))
    await store.mark_replayed(outbox, letter.event_id)
    get_logger(outbox=outbox).info("dead letter replayed", event_id=letter.event_id, how=done)
    return done


def _run_dlq(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        run_async(main)
    except (ConnectorError, SetupError) as exc:
        fail(str(exc), code=1)
    except Exception as exc:  # database unreachable, table missing: one line, no traceback
        fail(f"dlq: {database_error(exc)}", code=1)
