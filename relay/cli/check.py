"""`outbox-relay check` (validate a config, print its effective settings, optionally connect)
and `outbox-relay schema` (the config file's JSON schema)."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
import yaml

from outbox_relay.assembly import SetupError, build_sink, build_source
from outbox_relay.cli.common import CONFIG_OPTION, fail, load, masked, run_async
from outbox_relay.config import OutboxConfig, RelayConfig, config_json_schema
from outbox_relay.deadletters import DeadLetterStore
from outbox_relay.interfaces import ConnectorError, DatabaseSource, Sink, Source
from outbox_relay.logs import configure_logging
from outbox_relay.secrets import scrubber
from outbox_relay.shared_reads import shared_reads_on_servers


@click.command()
@CONFIG_OPTION
@click.option("--connect", is_flag=True, help="Also connect to each database and broker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, for machines.")
def check(config_path: Path, connect: bool, as_json: bool) -> None:
    """Validate the config and print the effective settings (secrets masked) as YAML."""
    config = load(config_path)
    configure_logging("console", "warning")
    # The process's own settings (http, log, shutdown_grace), defaults included, then each outbox's.
    process = masked(config.model_dump(mode="json", exclude={"outboxes"}))
    if not as_json:
        click.echo(_as_yaml({"relay": process}, indent=""), nl=False)
    report = [
        _check_outbox(config_path, outbox, index, connect, as_json)
        for index, outbox in enumerate(config.outboxes)
    ]
    failed = any(not probe["ok"] for e in report for probe in e.get("connect", {}).values())
    document: dict[str, Any] = {"config": str(config_path), "relay": process, "outboxes": report}
    if connect and len(config.outboxes) > 1:
        failed = _shared_reads_found(config, document, as_json) or failed
    if as_json:
        click.echo(json.dumps({**document, "ok": not failed}))
    if failed:
        sys.exit(1)
    if not as_json:
        click.echo(_as_yaml({str(config_path): "ok"}, indent=""), nl=False)


def _check_outbox(
    config_path: Path, outbox: OutboxConfig, index: int, connect: bool, as_json: bool
) -> dict[str, Any]:
    """One outbox's entry of the report (printed as YAML at once unless `as_json`): its settings,
    and with `connect` how each probe went. Exits 2 when its connectors cannot be built."""
    try:
        source, sink = build_source(outbox, index), build_sink(outbox, index)
    except SetupError as exc:
        fail(f"{config_path}: {exc}")
    settings = masked(outbox.model_dump(mode="json"))
    if sink.describe():
        settings["sink effective settings"] = masked(sink.describe())
    entry: dict[str, Any] = {"outbox": outbox.name, "settings": settings}
    if not as_json:
        click.echo(_as_yaml({f"outbox {outbox.name}": settings}, indent=""), nl=False)
    if connect:
        outcomes = run_async(lambda: _connect_checks(source, sink, outbox))
        entry["connect"] = _connect_shape(outcomes)
        if not as_json:
            click.echo(_connect_yaml(entry["connect"]), nl=False)
    return entry


def _shared_reads_found(config: RelayConfig, document: dict[str, Any], as_json: bool) -> bool:
    """Whether two outboxes read one table on the servers (two spellings of one server, or a
    search_path, can hide it from the config); adds them to `document` and prints them."""
    shared = run_async(lambda: shared_reads_on_servers(config))
    if not shared:
        return False
    document["shared reads"] = shared
    if not as_json:
        click.echo(_connect_yaml_list("shared reads", shared), nl=False)
    return True


def _as_yaml(value: Any, indent: str) -> str:
    text = yaml.safe_dump(value, sort_keys=True, allow_unicode=True, default_flow_style=False, width=100)
    return "".join(f"{indent}{line}\n" for line in text.splitlines())


class _Verbatim(str):
    """A message shown as written: a YAML literal block when plain style would need quotes (a
    colon, quotes, a leading indicator), so that the text stays greppable and the output YAML."""


class _CheckDumper(yaml.SafeDumper):
    pass


def _represent_verbatim(dumper: yaml.SafeDumper, text: _Verbatim) -> yaml.Node:
    plain = (
        not any(mark in text for mark in (": ", " #", "'", '"', "\\"))
        and text[:1] not in "-?:,[]{}#&*!|>'\"%@` "
    )
    plain = plain and not text.endswith(":") and text.isprintable() and text == text.strip()
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style=None if plain else "|")


_CheckDumper.add_representer(_Verbatim, _represent_verbatim)


def _connect_shape(outcomes: dict[str, list[str]]) -> dict[str, Any]:
    """The `connect:` part of an outbox, the same in YAML and JSON: per probe `ok: true` and its
    notes, or `ok: false` and the error."""
    shape: dict[str, Any] = {}
    for label, outcome in outcomes.items():
        if outcome[0].startswith("FAILED"):
            shape[label] = {"ok": False, "error": outcome[0].removeprefix("FAILED: ")}
        else:
            shape[label] = {"ok": True, "notes": outcome[1:]}
    return shape


def _connect_yaml(shape: dict[str, Any]) -> str:
    """`_connect_shape` as check's text output shows it (messages kept greppable)."""
    shown = {
        label: {
            key: [_Verbatim(n) for n in v] if key == "notes" else _Verbatim(v) if key == "error" else v
            for key, v in probe.items()
        }
        for label, probe in shape.items()
    }
    text = yaml.dump(
        {"connect": shown}, Dumper=_CheckDumper, sort_keys=False, allow_unicode=True, width=2**30
    )
    return "".join(f"  {line}\n" for line in text.splitlines())


def _connect_yaml_list(key: str, lines: list[str]) -> str:
    """A top-level list of messages in check's text output, kept greppable."""
    text = yaml.dump(
        {key: [_Verbatim(line) for line in lines]},
        Dumper=_CheckDumper,
        sort_keys=False,
        allow_unicode=True,
        width=2**30,
    )
    return text


async def _connect_checks(source: Source, sink: Sink, outbox: OutboxConfig) -> dict[str, list[str]]:
    """Per probe (database, dead letters, sink): "ok" and its notes, or "FAILED: why"."""
    outcome: dict[str, list[str]] = {}
    probes: list[tuple[str, Callable[[], Awaitable[list[str] | None]]]] = [
        ("database", partial(_check_source, source)),
        ("sink", sink.check),
    ]
    dsn = outbox.dead_letter_dsn()
    if dsn is not None:  # (its own database when dead_letter.dsn names one)
        probes.insert(1, ("dead letters", DeadLetterStore(dsn, outbox.dead_letter.table).check))
    for label, probe in probes:
        try:
            outcome[label] = ["ok", *(await probe() or [])]
        except (ConnectorError, OSError) as exc:
            outcome[label] = [scrubber.scrub(f"FAILED: {exc}")]
    await source.close()
    return outcome


async def _check_source(source: Source) -> list[str]:
    """The database side of a source that has one; any other source is started and closed."""
    if isinstance(source, DatabaseSource):
        return await source.check()
    await source.start()
    return []


@click.command()
def schema() -> None:
    """Print the JSON schema of the config file."""
    click.echo(json.dumps(config_json_schema(), indent=2, sort_keys=True))
