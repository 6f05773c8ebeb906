"""Progress of a long command (`demo`, `drill`, `run --drain`) on stderr.

On a terminal, one line that rich redraws in place (lines printed meanwhile, logs and, when it
is the same terminal, stdout, go above it). Anywhere else (a pipe, a log file, CI) a plain
`label: key=value ...` line now and then, never an escape code; or, where the stream carries JSON
logs, a log record of its own, so that every line stays one JSON document.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.text import Text

#: Seconds between plain lines when the stream is not a terminal: often enough to see that a
#: long command moves, rare enough not to fill a log file.
PLAIN_INTERVAL = 5.0
#: Seconds between redraws on a terminal.
TERMINAL_INTERVAL = 1.0

Fields = Mapping[str, object]


def plain_line(label: str, fields: Fields) -> str:
    return " ".join([f"{label}:", *(f"{key}={value}" for key, value in fields.items())])


def styled_line(label: str, fields: Fields) -> Text:
    text = Text(f"{label}:", style="bold")
    for key, value in fields.items():
        text.append(f" {key}=", style="dim")
        text.append(str(value), style="cyan")
    return text


class RateMeter:
    """Events a second between two readings of a growing count."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._count: int | None = None
        self._at = 0.0

    def rate(self, count: int) -> float:
        now = self._clock()
        previous, since = self._count, self._at
        self._count, self._at = count, now
        if previous is None or now <= since:
            return 0.0
        return (count - previous) / (now - since)


class Progress:
    """A progress line for `label`, updated with `update(fields)`; use it as a context manager
    (on a terminal the line stays, with its last fields, once it closes).

    `terminal` overrides what `stream.isatty()` says (the tests use both ways)."""

    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        *,
        terminal: bool | None = None,
        interval: float = PLAIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        log: Any = None,
    ) -> None:
        self.label = label
        #: Off a terminal, the logger the progress goes to instead of plain lines (JSON logs).
        self._log = log
        self._stream = stream if stream is not None else sys.stderr
        self.terminal = self._stream.isatty() if terminal is None else terminal
        self._interval = interval
        self._clock = clock
        self._last: Fields = {}
        self._shown: str | None = None
        self._printed_at: float | None = None
        self._live: Live | None = None
        if self.terminal:
            console = Console(file=self._stream, force_terminal=True, highlight=False)
            # Lines printed to stdout (when it is the same terminal) and log lines go above the
            # progress line while it is up.
            on_stderr = self._stream is sys.stderr
            self._live = Live(
                Text(""),
                console=console,
                auto_refresh=False,  # redrawn on update: no thread of its own
                redirect_stdout=on_stderr and sys.stdout.isatty(),
                redirect_stderr=on_stderr,
            )

    @property
    def period(self) -> float:
        """How often a caller need measure: what is measured more often is never shown."""
        return TERMINAL_INTERVAL if self.terminal else self._interval

    def __enter__(self) -> Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def update(self, fields: Fields) -> None:
        self._last = dict(fields)
        if self._live is not None:
            self._live.update(styled_line(self.label, self._last), refresh=True)
            return
        now = self._clock()
        if self._printed_at is None or now - self._printed_at >= self._interval:
            self._print_plain()
            self._printed_at = now

    def close(self) -> None:
        """Show the last fields for good: the terminal's line stops being redrawn; a plain
        stream gets them unless its last line said the same."""
        if self._live is not None:
            if self._live.is_started:
                self._live.update(styled_line(self.label, self._last), refresh=True)
                self._live.stop()
            return
        if self._last and plain_line(self.label, self._last) != self._shown:
            self._print_plain()

    def _print_plain(self) -> None:
        line = plain_line(self.label, self._last)
        if self._log is not None:
            self._log.info(f"{self.label}: progress", **self._last)
            self._shown = line
            return
        self._stream.write(line + "\n")
        self._stream.flush()
        self._shown = line


async def keep_showing(progress: Progress, measure: Callable[[], Awaitable[Fields]]) -> None:
    """Measure and show every `progress.period` until cancelled."""
    while True:
        progress.update(await measure())
        await asyncio.sleep(progress.period)  # (a cadence, not a retry)


@contextlib.asynccontextmanager
async def showing(
    label: str,
    measure: Callable[[], Awaitable[Fields]],
    last: Callable[[], Fields],
    stream: TextIO | None = None,
    log: Any = None,
) -> AsyncIterator[Progress]:
    """A progress line on `stream` (stderr) kept up to date while the block runs, ending on
    `last()` (measured without the connections the block may have closed); off a terminal, log
    records on `log` instead of plain lines when it is given."""
    with Progress(label, stream, log=log) as progress:
        shower = asyncio.create_task(keep_showing(progress, measure))
        try:
            yield progress
        finally:
            shower.cancel()
            await asyncio.gather(shower, return_exceptions=True)
            progress.update(last())
