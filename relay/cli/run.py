"""`outbox-relay run`: relay events until stopped."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from outbox_relay.cli.common import CONFIG_OPTION, fail, load, run_async
from outbox_relay.logs import configure_logging
from outbox_relay.runner import Relay, SetupError, build_pipelines, tune_garbage_collector
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
        return await relay.run(drain=drain)

    if len(config.outboxes) > 1:  # (what the config alone shows was refused when it loaded)
        shared = run_async(lambda: shared_reads_on_servers(config))
        if shared:
            fail([f"{config_path}: {problem}" for problem in shared])
    tune_garbage_collector()
    code = run_async(main)
    if relay.refusals:
        fail([f"{config_path}: {refusal}" for refusal in relay.refusals], code)
    sys.exit(code)
