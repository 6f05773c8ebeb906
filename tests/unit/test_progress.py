"""The progress line of demo, drill and run --drain: redrawn in place on a terminal (a real
pseudo-terminal here), plain lines now and then anywhere else, never an escape code there."""

from __future__ import annotations

import asyncio
import io
import os
import pty

from outbox_relay.progress import Progress, RateMeter, plain_line, showing


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _read_all(fd: int) -> bytes:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_on_a_pseudo_terminal_the_line_is_redrawn_in_place_with_escape_codes() -> None:
    leader, follower = pty.openpty()
    stream = os.fdopen(follower, "w", encoding="utf-8", closefd=False)
    try:
        with Progress("drain", stream) as progress:
            assert progress.terminal
            progress.update({"left": 10, "published": 0})
            progress.update({"left": 0, "published": 10})
        stream.flush()
        shown = _read_all(leader).decode()
    finally:
        stream.close()
        os.close(follower)
        os.close(leader)
    assert "\x1b[" in shown, "styled and redrawn with escape codes"
    assert "\x1b[2K" in shown, "the earlier line is erased, not followed by a new one"
    assert "published=" in shown
    assert shown.count("\n") <= 2, f"one line updated in place, not a line per update: {shown!r}"


def test_off_a_terminal_plain_lines_come_at_most_once_an_interval_without_escape_codes() -> None:
    stream, clock = io.StringIO(), _Clock()
    with Progress("drain", stream, interval=5.0, clock=clock) as progress:
        assert not progress.terminal
        progress.update({"left": 30, "published": 0})
        clock.now += 1
        progress.update({"left": 20, "published": 10})  # within the interval: not shown
        clock.now += 5
        progress.update({"left": 5, "published": 25})
        clock.now += 1
        progress.update({"left": 0, "published": 30})  # shown when the progress closes
    lines = stream.getvalue().splitlines()
    assert lines == [
        "drain: left=30 published=0",
        "drain: left=5 published=25",
        "drain: left=0 published=30",
    ]
    assert "\x1b" not in stream.getvalue()


def test_closing_does_not_repeat_a_line_already_shown() -> None:
    stream = io.StringIO()
    with Progress("demo", stream, terminal=False) as progress:
        progress.update({"written": 5})
    assert stream.getvalue() == "demo: written=5\n"


def test_a_forced_terminal_styles_the_line_and_a_forced_plain_stream_does_not() -> None:
    styled, plain = io.StringIO(), io.StringIO()
    for stream, terminal in ((styled, True), (plain, False)):
        with Progress("drill", stream, terminal=terminal) as progress:
            progress.update({"written": "1/2"})
    assert "\x1b[" in styled.getvalue()
    assert plain.getvalue() == plain_line("drill", {"written": "1/2"}) + "\n"


def test_the_rate_is_the_growth_between_two_readings_over_the_seconds_between_them() -> None:
    clock = _Clock()
    meter = RateMeter(clock)
    assert meter.rate(100) == 0.0, "nothing to compare the first reading with"
    clock.now += 2
    assert meter.rate(300) == 100.0
    assert meter.rate(300) == 0.0, "no time passed: no rate rather than a division by zero"


def test_showing_measures_while_the_block_runs_and_ends_on_the_last_fields() -> None:
    stream = io.StringIO()
    measured: list[int] = []

    async def measure() -> dict[str, object]:
        measured.append(1)
        return {"phase": "working"}

    async def main() -> None:
        async with showing("demo", measure, lambda: {"phase": "done"}, stream):
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert measured, "measured at least once"
    assert stream.getvalue().splitlines()[-1] == "demo: phase=done"
