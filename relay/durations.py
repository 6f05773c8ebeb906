"""Durations in config files: `200ms`, `5s`, `1m`, `1h`, or a plain number of seconds."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, WithJsonSchema

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: The longest duration accepted: longer ones are mistakes, and overflow the clients' timers
#: (librdkafka's timeouts are int32 milliseconds, about 24 days).
MAX_SECONDS = 7 * 24 * 3600.0
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"


def parse_duration(value: object) -> float:
    """Seconds as a float. Raises ValueError with a message fit for the user."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 200ms, 5s or 1m")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if not match:
            raise ValueError(
                f"'{_shown(value)}' is not a duration; use a number with ms, s, m or h (200ms, 5s, 1m)"
            )
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError("must be a duration such as 200ms, 5s or 1m")
    if math.isnan(seconds):
        raise ValueError("must be a duration such as 200ms, 5s or 1m, not NaN")
    if seconds < 0:
        raise ValueError("must not be negative")
    if math.isinf(seconds):
        raise ValueError("must be a finite duration such as 200ms, 5s or 1m, not infinity")
    if seconds > MAX_SECONDS:
        raise ValueError("must be at most 7 days (168h)")
    return seconds


def _shown(value: str) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return text if len(text) <= 40 else text[:40] + "..."


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
                {"type": "string", "pattern": DURATION_PATTERN},
            ],
            "description": "Seconds, or a number with a unit: 200ms, 5s, 1m, 1h.",
        }
    ),
]


def off_or_at_least(seconds: float, least: float, why: str) -> float:
    """A timeout setting that is 0 (off) or at least `least` seconds; `why` says what a shorter
    one would do wrong."""
    if 0 < seconds < least:
        raise ValueError(f"must be 0 (off) or at least {least:g}s: {why}")
    return seconds
