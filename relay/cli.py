"""The `outbox-relay` command line."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import yaml

from outbox_relay import __version__
from outbox_relay.config import ConfigError, RelayConfig, config_json_schema, load_config
from outbox_relay.deadletters import DeadLetterStore
from outbox_relay.deadletters import as_event as as_dead_letter_event
from outbox_relay.interfaces import ConnectorError
from outbox_relay.leadership import lease_line
from outbox_relay.logs import configure_logging, get_logger
from outbox_relay.runner import (
    Relay,
    SetupError,
    build_dead_letter_store,
    build_pipelines,
    build_sink,
    build_source,
    database_setup,
    set_up_database,
    tune_garbage_collector,
)
from outbox_relay.secrets import is_secret_key, scrubber
from outbox_relay.shared_reads import shared_reads_on_servers

T = TypeVar("T")


class _ConfigPath(click.ParamType):  # type: ignore[type-arg]
    """A path taken as given: click.Path would turn an empty one into '.' (a directory)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path):
            return value
        text = str(value)
        return Path(text) if text else ""


CONFIG_OPTION = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=_ConfigPath(),
    help="The relay's YAML config file.",
)


#: Problems printed at most: the rest are counted (a file of unknown keys has one per key).
MAX_PROBLEM_LINES = 20


def _fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    lines = [lines] if isinstance(lines, str) else lines
    for line in lines[:MAX_PROBLEM_LINES]:
        # One line per problem: a client library's message may carry a line break. (Scrubbed
        # before its white space is folded: a secret holding a line break is still found.)
        click.echo(" ".join(scrubber.scrub(line).split()), err=True)
    if len(lines) > MAX_PROBLEM_LINES:
        click.echo(f"... and {len(lines) - MAX_PROBLEM_LINES} more problems", err=True)
    sys.exit(code)


def _load(path: Path) -> RelayConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        _fail(exc.problems)


def _run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(factory())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="outbox-relay")
def cli() -> None:
    """Relay transactional-outbox events from PostgreSQL to message brokers."""


@cli.command()
@CONFIG_OPTION
@click.option("--drain", is_flag=True, help="Exit 0 once the outbox is empty (batch jobs, tests).")
def run(config_path: Path, drain: bool) -> None:
    """Relay events until stopped (SIGTERM/SIGINT finish in-flight events, then exit 0)."""
    config = _load(config_path)
    configure_logging(config.log.format, config.log.level)
    try:
        pipelines = build_pipelines(config)
    except SetupError as exc:
        _fail(f"{config_path}: {exc}")

    relay = Relay(config, pipelines)

    async def main() -> int:
        return await relay.run(drain=drain)

    if len(config.outboxes) > 1:  # (what the config alone shows was refused when it loaded)
        shared = _run_async(lambda: shared_reads_on_servers(config))
        if shared:
            _fail([f"{config_path}: {problem}" for problem in shared])
    tune_garbage_collector()
    code = _run_async(main)
    if relay.refusals:
        _fail([f"{config_path}: {refusal}" for refusal in relay.refusals], code)
    sys.exit(code)


@cli.command()
@CONFIG_OPTION
@click.option("--connect", is_flag=True, help="Also connect to each database and broker.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document, for machines.")
def check(config_path: Path, connect: bool, as_json: bool) -> None:
    """Validate the config and print the effective settings (secrets masked) as YAML."""
    config = _load(config_path)
    configure_logging("console", "warning")
    report: list[dict[str, Any]] = []
    for index, outbox in enumerate(config.outboxes):
        try:
            source, sink = build_source(outbox, index), build_sink(outbox, index)
        except SetupError as exc:
            _fail(f"{config_path}: {exc}")
        settings = _masked(outbox.model_dump(mode="json"))
        if sink.describe():
            settings["sink effective settings"] = _masked(sink.describe())
        entry: dict[str, Any] = {"outbox": outbox.name, "settings": settings}
        if not as_json:
            click.echo(_as_yaml({f"outbox {outbox.name}": settings}, indent=""), nl=False)
        if connect:
            outcomes = _run_async(lambda s=source, k=sink, o=outbox: _connect_checks(s, k, o))  # type: ignore[misc]
            entry["connect"] = _connect_shape(outcomes)
            if not as_json:
                click.echo(_connect_yaml(entry["connect"]), nl=False)
        report.append(entry)
    failed = any(not probe["ok"] for e in report for probe in e.get("connect", {}).values())
    document: dict[str, Any] = {"config": str(config_path), "outboxes": report}
    if connect and len(config.outboxes) > 1:
        # Two spellings of one server, or a search_path, can hide a table two outboxes read.
        shared = _run_async(lambda: shared_reads_on_servers(config))
        if shared:
            failed = True
            document["shared reads"] = shared
            if not as_json:
                click.echo(_connect_yaml_list("shared reads", shared), nl=False)
    if as_json:
        click.echo(json.dumps({**document, "ok": not failed}))
    if failed:
        sys.exit(1)
    if not as_json:
        click.echo(_as_yaml({str(config_path): "ok"}, indent=""), nl=False)


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


def _masked(value: Any) -> Any:
    """Settings for display: every string with a password in it, masked."""
    if isinstance(value, str):
        return scrubber.scrub(value)
    if isinstance(value, dict):
        return {k: "***" if is_secret_key(str(k)) and v else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


async def _connect_checks(source: Any, sink: Any, outbox: Any) -> dict[str, list[str]]:
    """Per probe (database, dead letters, sink): "ok" and its notes, or "FAILED: why"."""
    outcome: dict[str, list[str]] = {}
    probes = [("database", source.check), ("sink", sink.check)]
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


@cli.command("init-db")
@CONFIG_OPTION
@click.option("--print-sql", is_flag=True, help="Print the SQL instead of running it.")
def init_db(config_path: Path, print_sql: bool) -> None:
    """Create the outbox table, its partial index and the NOTIFY trigger (idempotent)."""
    config = _load(config_path)
    for index, outbox in enumerate(config.outboxes):
        try:
            source = build_source(outbox, index)
        except SetupError as exc:
            _fail(f"{config_path}: {exc}")
        if print_sql:
            statements, elsewhere = database_setup(outbox, source)
            click.echo(f"-- outbox {outbox.name}")
            click.echo(";\n\n".join(s.as_string() for s in statements) + ";\n")
            for _, other in elsewhere:
                click.echo(f"-- outbox {outbox.name}: in the dead-letter database")
                click.echo(";\n\n".join(s.as_string() for s in other) + ";\n")
            continue
        if getattr(outbox.source, "dsn", None) is None:
            _fail(f"{config_path}: outboxes[{index}].source: this source has no database to set up")
        try:
            notes = _run_async(lambda o=outbox, s=source: set_up_database(o, s))  # type: ignore[misc]
        except Exception as exc:
            _fail(f"{config_path}: outboxes[{index}]: init-db failed: {_one_line(exc)}", code=1)
        for note in notes:
            click.echo(f"outbox {outbox.name}: {note}")
        click.echo(f"outbox {outbox.name}: database ready")


def _one_line(exc: BaseException) -> str:
    """An error as one line: PostgreSQL's messages may carry a DETAIL or HINT line."""
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


@cli.command()
@CONFIG_OPTION
def status(config_path: Path) -> None:
    """Per outbox: pending events, age of the oldest, published in the last minute."""
    config = _load(config_path)
    configure_logging("console", "error")

    async def main() -> int:
        failures = 0
        for index, outbox in enumerate(config.outboxes):
            source = build_source(outbox, index)
            try:
                # No start(): status must not open a replication stream or take over anything.
                for line in await source.status_lines():
                    click.echo(scrubber.scrub(f"{outbox.name}: {line}"))
                for line in await _parked_lines(outbox, index):
                    click.echo(scrubber.scrub(f"{outbox.name}: {line}"))
                dsn = getattr(outbox.source, "dsn", None)
                if outbox.lease.enabled and dsn is not None:
                    line = await lease_line(
                        dsn,
                        outbox.name,
                        outbox.lease.table,
                        outbox.source.lease_scope(),
                        outbox.source.lease_resolves(),
                    )
                    click.echo(scrubber.scrub(f"{outbox.name}: {line}"))
            except (ConnectorError, OSError) as exc:
                failures += 1
                click.echo(scrubber.scrub(f"{outbox.name}: unavailable: {exc}"))
            except Exception as exc:
                failures += 1
                click.echo(scrubber.scrub(f"{outbox.name}: unavailable: {type(exc).__name__}: {exc}"))
            finally:
                await source.close()
        return 1 if failures else 0

    try:
        sys.exit(_run_async(main))
    except SetupError as exc:
        _fail(f"{config_path}: {exc}")


async def _parked_lines(outbox: Any, index: int) -> list[str]:
    """What waits in the dead-letter table: dead-lettered events, and held ones (in order behind
    the first event of their aggregate) with how many aggregates they hold back."""
    store = build_dead_letter_store(outbox, index)
    if store is None:
        return []
    try:
        dead, held = await store.count(outbox.name), await store.count(outbox.name, "held")
        aggregates = len(await store.held_aggregates(outbox.name)) if held else 0
    except Exception as exc:  # (a missing table says nothing about the outbox itself)
        return [scrubber.scrub(f"dead letters unavailable: {type(exc).__name__}: {exc}")]
    finally:
        await store.close()
    return [f"dead_letters={dead} held={held} held_aggregates={aggregates}"]


@cli.group()
def dlq() -> None:
    """See, replay and purge dead-lettered events."""


OUTBOX_OPTION = click.option("--outbox", "outbox_name", help="Only this outbox (default: all).")
EVENT_OPTION = click.option("--event-id", "event_ids", multiple=True, help="Only these events (repeatable).")


def _dead_letter_targets(config: RelayConfig, outbox_name: str | None) -> list[tuple[int, Any]]:
    targets = [
        (i, o)
        for i, o in enumerate(config.outboxes)
        if (outbox_name is None or o.name == outbox_name) and o.dead_letter_dsn() is not None
    ]
    if outbox_name is not None and not targets:
        _fail(f"no outbox named {outbox_name} with a dead-letter table in this config")
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
    config = _load(config_path)

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
    config = _load(config_path)

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
                    click.echo(json.dumps(_masked(shown), default=str, sort_keys=True))
            finally:
                await store.close()

    _run_dlq(main)
    _fail_on_unknown(event_ids, found, outbox_name)


def _fail_on_unknown(event_ids: tuple[str, ...], found: set[str], outbox_name: str | None) -> None:
    """Exit 1 naming each event asked for by id that no dead-letter table holds."""
    where = f"outbox {outbox_name}'s dead-letter table" if outbox_name else "any dead-letter table"
    unknown = [event_id for event_id in dict.fromkeys(event_ids) if event_id not in found]
    if unknown:
        _fail([f"no such event in {where}: {event_id}" for event_id in unknown], code=1)


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
        _fail("name the events with --event-id (repeatable), or pass --all")
    config = _load(config_path)
    configure_logging("console", "info")
    found: set[str] = set()

    async def main() -> None:
        for index, outbox in _dead_letter_targets(config, outbox_name):
            store, source = _store(outbox), build_source(outbox, index)
            try:
                for letter in await store.entries(outbox.name, event_ids, include_replayed=bool(event_ids)):
                    found.add(letter.event_id)
                    if letter.replayed_at is not None:
                        click.echo(
                            f"{outbox.name} {letter.event_id}: replayed already at"
                            f" {letter.replayed_at:%Y-%m-%dT%H:%M:%SZ}, not replayed again"
                        )
                        continue
                    if letter.state == "held":
                        click.echo(
                            f"{outbox.name} {letter.event_id}: held, not replayed: the relay publishes held"
                            " events in order once the first one of their aggregate goes through"
                            " (purge that one to skip it)"
                        )
                        continue
                    done = await source.replay(as_dead_letter_event(letter))
                    await store.mark_replayed(outbox.name, letter.event_id)
                    get_logger(outbox=outbox.name).info(
                        "dead letter replayed", event_id=letter.event_id, how=done
                    )
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
        _fail("name the events with --event-id, or pass --replayed or --all")
    config = _load(config_path)
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


def _run_dlq(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        _run_async(main)
    except (ConnectorError, SetupError) as exc:
        _fail(str(exc), code=1)
    except Exception as exc:  # database unreachable, table missing: one line, no traceback
        hint = " (run: outbox-relay init-db)" if "does not exist" in str(exc) else ""
        _fail(f"dlq: {type(exc).__name__}: {exc}{hint}", code=1)


@cli.command()
@CONFIG_OPTION
@OUTBOX_OPTION
@click.option("--events", default=100_000, show_default=True, help="Events to write.")
@click.option("--aggregates", default=1_000, show_default=True, help="Aggregates they belong to.")
@click.option("--rate", default=2_000.0, show_default=True, help="Events written per second.")
@click.option("--kill-every", default="2s", show_default=True, help="SIGKILL a relay this often (0: never).")
@click.option("--replicas", default=1, show_default=True, help="Relay processes at once.")
@click.option("--broker-outage", default=None, help="Pause the broker this long (needs --broker-pid).")
@click.option("--broker-pid", type=int, default=None, help="PID of a local broker to pause with SIGSTOP.")
@click.option("--broker-stop-command", default=None, help="Or: shell command that stops the broker.")
@click.option("--broker-start-command", default=None, help="And the one that starts it again.")
@click.option("--db-restart", is_flag=True, help="Restart the database mid-run (needs --db-restart-command).")
@click.option("--db-restart-command", default=None, help="Shell command that restarts the database.")
@click.option("--freeze-every", default=None, help="SIGSTOP the relay holding the lease this often.")
@click.option("--freeze-for", default=None, help="Then SIGCONT it after this long (default: 2x lease.time).")
@click.option(
    "--cut-every", default=None, help="Cut the relay holding the lease off from the database this often."
)
@click.option(
    "--cut-mode",
    type=click.Choice(["close", "hold", "both"]),
    default="both",
    show_default=True,
    help="close: connections closed and refused; hold: kept open, nothing forwarded; both: in turn.",
)
@click.option("--cut-for", default=None, help="Then reconnect it after this long (default: 2x lease.time).")
@click.option("--drain-timeout", default="5m", show_default=True, help="How long to wait for the backlog.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def drill(
    config_path: Path,
    outbox_name: str | None,
    events: int,
    aggregates: int,
    rate: float,
    kill_every: str,
    replicas: int,
    broker_outage: str | None,
    broker_pid: int | None,
    broker_stop_command: str | None,
    broker_start_command: str | None,
    db_restart: bool,
    db_restart_command: str | None,
    freeze_every: str | None,
    freeze_for: str | None,
    cut_every: str | None,
    cut_mode: str,
    cut_for: str | None,
    drain_timeout: str,
    as_json: bool,
) -> None:
    """Write events, kill, freeze or cut off relays at random, read everything back: lost and
    reordered must be 0.

    Run it against a staging setup: it writes `drill` events into the outbox. Exit 1 when an
    event was lost or reordered.
    """
    from outbox_relay.drill import DrillPlan, check_plan, run_drill
    from outbox_relay.durations import parse_duration

    config = _load(config_path)
    configure_logging("json" if as_json else "console", "warning")
    names = [o.name for o in config.outboxes]
    if outbox_name is not None and outbox_name not in names:
        _fail(f"{config_path}: no outbox named {outbox_name} (outboxes: {', '.join(names)})")
    index = names.index(outbox_name) if outbox_name else 0
    if broker_outage and broker_pid is None and not (broker_stop_command and broker_start_command):
        _fail(
            "--broker-outage needs --broker-pid (a local broker process to pause) or both"
            " --broker-stop-command and --broker-start-command"
        )
    if db_restart and not db_restart_command:
        _fail("--db-restart needs --db-restart-command, e.g. 'pg_ctlcluster 16 main restart'")
    if events < 1 or aggregates < 1 or replicas < 1 or rate <= 0:
        _fail("--events, --aggregates, --replicas and --rate must be positive")
    try:
        plan = DrillPlan(
            events=events,
            aggregates=aggregates,
            rate=rate,
            kill_every=parse_duration(kill_every) or None,
            replicas=replicas,
            broker_outage=parse_duration(broker_outage) if broker_outage else None,
            broker_pid=broker_pid,
            broker_stop_command=broker_stop_command,
            broker_start_command=broker_start_command,
            db_restart_command=db_restart_command if db_restart else None,
            drain_timeout=parse_duration(drain_timeout),
            freeze_every=_flag_duration("--freeze-every", freeze_every) or None,
            freeze_for=_flag_duration("--freeze-for", freeze_for),
            cut_every=_flag_duration("--cut-every", cut_every) or None,
            cut_mode=cut_mode,
            cut_for=_flag_duration("--cut-for", cut_for),
        )
        check_plan(config, index, plan)
    except ValueError as exc:
        _fail(f"drill: {exc}")
    try:
        report = _run_async(lambda: run_drill(config, index, plan))
    except (ConnectorError, SetupError) as exc:
        _fail(f"drill: {exc}", code=1)
    click.echo(json.dumps(report.as_dict()) if as_json else report.as_text())
    sys.exit(0 if report.passed else 1)


def _flag_duration(flag: str, value: str | None) -> float | None:
    from outbox_relay.durations import parse_duration

    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


@cli.command()
def schema() -> None:
    """Print the JSON schema of the config file."""
    click.echo(json.dumps(config_json_schema(), indent=2, sort_keys=True))


@cli.command()
@click.option("--dsn", envvar="DATABASE_URL", help="Use this PostgreSQL instead of an embedded one.")
@click.option("--rate", default=50, show_default=True, help="Sample events written per second.")
@click.option("--duration", default=0.0, help="Stop after this many seconds (0: until Ctrl-C).")
def demo(dsn: str | None, rate: int, duration: float) -> None:
    """Embedded PostgreSQL, sample order events written continuously, relayed to stdout."""
    from outbox_relay.demo import run_demo

    sys.exit(run_demo(dsn, rate, duration))


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
