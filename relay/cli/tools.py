"""The tools beside the relay (relay.tools): `outbox-relay drill` and `outbox-relay demo`.
Their modules are imported when the command runs: the relay itself never loads them."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from outbox_relay.assembly import SetupError
from outbox_relay.cli.common import CONFIG_OPTION, OUTBOX_OPTION, fail, load, run_async
from outbox_relay.durations import parse_duration
from outbox_relay.interfaces import ConnectorError
from outbox_relay.logs import configure_logging

if TYPE_CHECKING:
    from outbox_relay.tools.drill_report import DrillPlan

#: The drill's options beyond the config, the outbox and --json (see `drill`).
_DRILL_OPTIONS: tuple[Callable[[Any], Any], ...] = (
    click.option("--events", default=100_000, show_default=True, help="Events to write."),
    click.option("--aggregates", default=1_000, show_default=True, help="Aggregates they belong to."),
    click.option("--rate", default=2_000.0, show_default=True, help="Events written per second."),
    click.option(
        "--kill-every", default="2s", show_default=True, help="SIGKILL a relay this often (0: never)."
    ),
    click.option("--replicas", default=1, show_default=True, help="Relay processes at once."),
    click.option("--broker-outage", default=None, help="Pause the broker this long (needs --broker-pid)."),
    click.option("--broker-pid", type=int, default=None, help="PID of a local broker to pause with SIGSTOP."),
    click.option("--broker-stop-command", default=None, help="Or: shell command that stops the broker."),
    click.option("--broker-start-command", default=None, help="And the one that starts it again."),
    click.option(
        "--db-restart", is_flag=True, help="Restart the database mid-run (needs --db-restart-command)."
    ),
    click.option("--db-restart-command", default=None, help="Shell command that restarts the database."),
    click.option("--freeze-every", default=None, help="SIGSTOP the relay holding the lease this often."),
    click.option(
        "--freeze-for", default=None, help="Then SIGCONT it after this long (default: 2x lease.time)."
    ),
    click.option(
        "--cut-every", default=None, help="Cut the relay holding the lease off from the database this often."
    ),
    click.option(
        "--cut-mode",
        type=click.Choice(["close", "hold", "both"]),
        default="both",
        show_default=True,
        help="close: connections closed and refused; hold: kept open, nothing forwarded; both: in turn.",
    ),
    click.option(
        "--cut-for", default=None, help="Then reconnect it after this long (default: 2x lease.time)."
    ),
    click.option(
        "--drain-timeout", default="5m", show_default=True, help="How long to wait for the backlog."
    ),
    click.option(
        "--logs",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Keep each relay's log in this directory (default: removed at the end).",
    ),
)


def _drill_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_DRILL_OPTIONS):  # (in the order written, as stacked decorators)
        command = option(command)
    return command


@click.command()
@CONFIG_OPTION
@OUTBOX_OPTION
@_drill_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def drill(config_path: Path, outbox_name: str | None, as_json: bool, **flags: Any) -> None:
    """Write events, kill, freeze or cut off relays at random, read everything back: lost and
    reordered must be 0.

    Run it against a staging setup: it writes `drill` events into the outbox. Exit 1 when an
    event was lost or reordered.
    """
    from outbox_relay.tools.drill import check_plan, run_drill

    config = load(config_path)
    configure_logging("json" if as_json else "console", "warning")
    names = [o.name for o in config.outboxes]
    if outbox_name is not None and outbox_name not in names:
        fail(f"{config_path}: no outbox named {outbox_name} (outboxes: {', '.join(names)})")
    index = names.index(outbox_name) if outbox_name else 0
    _refuse_incomplete_flags(flags)
    try:
        plan = _drill_plan(flags)
        check_plan(config, index, plan)
    except ValueError as exc:
        fail(f"drill: {exc}")
    # SIGTERM ends the drill as Ctrl-C does: its relays stopped, its temporary files removed
    # (by default a SIGTERM ended the drill alone and left its relays running).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run_async(lambda: run_drill(config, index, plan))
    except (ConnectorError, SetupError) as exc:
        fail(f"drill: {exc}", code=1)
    click.echo(json.dumps(report.as_dict()) if as_json else report.as_text())
    sys.exit(0 if report.passed else 1)


def _refuse_incomplete_flags(flags: dict[str, Any]) -> None:
    """Exit 2 for a fault asked for without what it needs, or a count that is not positive."""
    commands = flags["broker_stop_command"] and flags["broker_start_command"]
    if flags["broker_outage"] and flags["broker_pid"] is None and not commands:
        fail(
            "--broker-outage needs --broker-pid (a local broker process to pause) or both"
            " --broker-stop-command and --broker-start-command"
        )
    if flags["db_restart"] and not flags["db_restart_command"]:
        fail("--db-restart needs --db-restart-command, e.g. 'pg_ctlcluster 16 main restart'")
    if min(flags["events"], flags["aggregates"], flags["replicas"]) < 1 or flags["rate"] <= 0:
        fail("--events, --aggregates, --replicas and --rate must be positive")


def _drill_plan(flags: dict[str, Any]) -> DrillPlan:
    """The plan the flags ask for; ValueError naming a flag whose duration cannot be read."""
    from outbox_relay.tools.drill_report import DrillPlan

    outage = flags["broker_outage"]
    return DrillPlan(
        events=flags["events"],
        aggregates=flags["aggregates"],
        rate=flags["rate"],
        kill_every=parse_duration(flags["kill_every"]) or None,
        replicas=flags["replicas"],
        broker_outage=parse_duration(outage) if outage else None,
        broker_pid=flags["broker_pid"],
        broker_stop_command=flags["broker_stop_command"],
        broker_start_command=flags["broker_start_command"],
        db_restart_command=flags["db_restart_command"] if flags["db_restart"] else None,
        drain_timeout=parse_duration(flags["drain_timeout"]),
        freeze_every=_flag_duration("--freeze-every", flags["freeze_every"]) or None,
        freeze_for=_flag_duration("--freeze-for", flags["freeze_for"]),
        cut_every=_flag_duration("--cut-every", flags["cut_every"]) or None,
        cut_mode=flags["cut_mode"],
        cut_for=_flag_duration("--cut-for", flags["cut_for"]),
        logs=flags["logs"],
    )


def _flag_duration(flag: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


@click.command()
@click.option(
    "--dsn",
    help="Use this PostgreSQL instead of an embedded one (tables of the demo's own:"
    " outbox_relay_demo, outbox_relay_demo_dead_letters, demo_orders; its own NOTIFY channel).",
)
@click.option("--rate", default=50.0, show_default=True, help="Sample events written per second.")
@click.option("--duration", default="0", help="Stop after this long, e.g. 15s (0: until Ctrl-C).")
# Acknowledge every Nth event without writing it: proves that the demo's check can fail.
@click.option("--drop-every", type=click.IntRange(min=0), default=0, hidden=True)
def demo(dsn: str | None, rate: float, duration: str, drop_every: int) -> None:
    """Embedded PostgreSQL, orders written through their lifecycle, relayed to a file sink; on
    Ctrl-C or after --duration: drain, read back, check. Exit 1 when an event was lost or out
    of order."""
    from outbox_relay.tools.demo import run_demo

    try:
        seconds = parse_duration(duration)
    except ValueError as exc:
        fail(f"--duration: {exc}")
    if rate <= 0:
        fail(f"--rate: must be more than 0, not {rate:g}")
    sys.exit(run_demo(dsn, rate, seconds, drop_every))
