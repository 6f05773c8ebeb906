"""`outbox-relay run`: relay events until stopped."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from outbox_relay.assembly import SetupError, build_pipelines
from outbox_relay.cli.common import CONFIG_OPTION, fail, load, run_async
from outbox_relay.logs import configure_logging, get_logger
from outbox_relay.progress import Fields, RateMeter, showing
from outbox_relay.runner import Relay, tune_garbage_collector
from outbox_relay.shared_reads import shared_reads_on_servers


@click.command()
@CONFIG_OPTION
@click.option("--drain", is_flag=True, help="Exit 0 once the outbox is empty (batch jobs, tests).")
def run(config_path: Path, drain: bool) -> None:
    """Relay events until stopped (SIGTERM/SIGINT finish in-flight events, then exit 0)."""
    config = load(config_path)
    configure_logging(config.log.format, config.log.level)
    try:
        pipelines = build_pipelines(config)
    except SetupError as exc:
        fail(f"{config_path}: {exc}")

    relay = Relay(config, pipelines)

    async def main() -> int:
        return await _drain(relay) if drain else await relay.run()

    if len(config.outboxes) > 1:  # (what the config alone shows was refused when it loaded)
        shared = run_async(lambda: shared_reads_on_servers(config))
        if shared:
            fail([f"{config_path}: {problem}" for problem in shared])
    tune_garbage_collector()
    code = run_async(main)
    if relay.refusals:
        fail([f"{config_path}: {refusal}" for refusal in relay.refusals], code)
    sys.exit(code)


async def _drain(relay: Relay) -> int:
    """`relay.run(drain=True)` with progress on stderr: events published and the rate. (From the
    pipelines' counts alone: a query for the rows left would open connections of the sources
    outside their pipelines' lives and lease terms.)"""
    meter, started = RateMeter(), time.monotonic()

    def published() -> int:
        return sum(pipeline.published for pipeline in relay.pipelines)

    async def measure() -> Fields:
        return {"published": published(), "rate": f"{meter.rate(published()):.0f}/s"}

    def last() -> Fields:
        return {"published": published(), "seconds": f"{time.monotonic() - started:.1f}"}

    async with showing("drain", measure, last, log=None if _console_logs(relay) else get_logger()):
        return await relay.run(drain=True)


def _console_logs(relay: Relay) -> bool:
    """Whether the logs on stderr are console lines (else JSON: progress goes there as records)."""
    fmt = relay.config.log.format
    return fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
