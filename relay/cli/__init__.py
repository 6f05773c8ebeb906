"""The `outbox-relay` command line, its commands grouped by concern: running the relay
(relay.cli.run), checking a config (relay.cli.check), setting up and watching the database
(relay.cli.database), dead letters (relay.cli.dlq), and the tools beside the relay
(relay.cli.tools)."""

from __future__ import annotations

import sys

import click

from outbox_relay import __version__
from outbox_relay.cli.check import check, schema
from outbox_relay.cli.database import init_db, status
from outbox_relay.cli.dlq import dlq
from outbox_relay.cli.run import run
from outbox_relay.cli.tools import demo, drill


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="outbox-relay")
def cli() -> None:
    """Relay transactional-outbox events from PostgreSQL to message brokers."""


for _command in (run, check, init_db, status, dlq, drill, schema, demo):
    cli.add_command(_command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["cli", "main"]
