"""Structured logs: JSON lines on stderr (stdout belongs to the stdout sink), console when a TTY."""

from __future__ import annotations

import itertools
import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from outbox_relay.secrets import scrubber

#: A log field's text longer than this is cut, with a note of its length, before it is scrubbed
#: and rendered: a value of megabytes (an aggregate id, a broker's error) costs as little as a
#: short one, and never holds up the event loop the relay runs on.
MAX_FIELD_CHARS = 4096
#: Items of a list or mapping field shown (the rest is counted), and how deep they are walked.
MAX_ITEMS = 100
_MAX_DEPTH = 4


def _shown(value: Any, depth: int = 0) -> Any:
    """A log field's value as it may be shown: every text in it cut and scrubbed."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return scrubber.scrub_shortened(value, MAX_FIELD_CHARS)
    if isinstance(value, BaseException):
        return scrubber.scrub_shortened(f"{type(value).__name__}: {value}", MAX_FIELD_CHARS)
    if depth < _MAX_DEPTH and isinstance(value, dict):
        shown = {k: _shown(v, depth + 1) for k, v in itertools.islice(value.items(), MAX_ITEMS)}
        if len(value) > MAX_ITEMS:
            shown["..."] = f"[{len(value)} items, cut]"
        return shown
    if depth < _MAX_DEPTH and isinstance(value, list | tuple | set | frozenset):
        items = [_shown(v, depth + 1) for v in itertools.islice(value, MAX_ITEMS)]
        if len(value) > MAX_ITEMS:
            items.append(f"... [{len(value)} items, cut]")
        return items
    return scrubber.scrub_shortened(str(value), MAX_FIELD_CHARS)


def _scrub_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        event_dict[key] = _shown(value)
    return event_dict


class _CurrentStderr:
    """sys.stderr as it is when a line is written, not when logging was configured: a progress
    line on the terminal (relay.progress) takes its place for a while and prints log lines above
    itself instead of under its feet."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _scrub_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("outbox-relay").bind(**bound)
