"""What every command of the command line shares: the config option, loading the config, and
printing a problem as one masked line before exiting."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from outbox_relay.config import ConfigError, RelayConfig, load_config
from outbox_relay.secrets import is_secret_key, scrubber

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
OUTBOX_OPTION = click.option("--outbox", "outbox_name", help="Only this outbox (default: all).")


#: Problems printed at most: the rest are counted (a file of unknown keys has one per key).
MAX_PROBLEM_LINES = 20


def fail(lines: list[str] | str, code: int = 2) -> NoReturn:
    """Print each problem as one masked line on stderr (at most MAX_PROBLEM_LINES) and exit."""
    lines = [lines] if isinstance(lines, str) else lines
    for line in lines[:MAX_PROBLEM_LINES]:
        # One line per problem: a client library's message may carry a line break. (Scrubbed
        # before its white space is folded: a secret holding a line break is still found.)
        click.echo(" ".join(scrubber.scrub(line).split()), err=True)
    if len(lines) > MAX_PROBLEM_LINES:
        click.echo(f"... and {len(lines) - MAX_PROBLEM_LINES} more problems", err=True)
    sys.exit(code)


def load(path: Path) -> RelayConfig:
    """The config at `path`, or exit 2 with its problems."""
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(exc.problems)


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(factory())


def one_line(exc: BaseException) -> str:
    """An error as one line: PostgreSQL's messages may carry a DETAIL or HINT line."""
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__


#: SQLSTATE undefined_table: a relay table init-db makes is missing.
_UNDEFINED_TABLE = "42P01"


def database_error(exc: BaseException) -> str:
    """An error as one line without the server's LINE/caret excerpt of the statement, with the
    fix when a table is missing (not for a database or a role that does not exist: init-db
    makes neither)."""
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)
    text = f"{type(exc).__name__}: {primary or one_line(exc)}"
    return (
        f"{text} (run: outbox-relay init-db)" if getattr(exc, "sqlstate", None) == _UNDEFINED_TABLE else text
    )


def masked(value: Any) -> Any:
    """Settings for display: every string with a password in it, masked."""
    if isinstance(value, str):
        return scrubber.scrub(value)
    if isinstance(value, dict):
        return {k: "***" if is_secret_key(str(k)) and v else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value
