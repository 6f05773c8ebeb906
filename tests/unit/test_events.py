from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from outbox_relay.events import headers_from_json, iso_utc


@pytest.mark.parametrize(
    "timestamp",
    [0.0, 1.5, 1795483405.0, 1795483405.123456, 1795483405.9999996, 1795483405.0000004, 951782400.25],
)
def test_iso_utc_formats_exactly_like_datetime(timestamp: float) -> None:
    assert iso_utc(timestamp) == datetime.fromtimestamp(timestamp, UTC).isoformat()


def test_iso_utc_agrees_with_datetime_on_many_timestamps_sharing_and_changing_seconds() -> None:
    rng = random.Random(7)
    start = 1795483405.0
    for _ in range(20_000):
        timestamp = round(start + rng.uniform(0, 5), rng.choice((0, 3, 6, 7)))
        assert iso_utc(timestamp) == datetime.fromtimestamp(timestamp, UTC).isoformat()


def test_header_values_that_are_not_strings_keep_their_json_text() -> None:
    raw = (
        b'{"n": 123456789012345678901234567890, "price": 1.10, "big": 1e400, "o": {"a": [1, 2.50]}, "s": "x"}'
    )
    headers, problem = headers_from_json(raw)
    assert problem is None
    assert headers == {"n": "123456789012345678901234567890", "price": "1.10", "big": "1e400",
                       "o": '{"a": [1, 2.50]}', "s": "x"}  # fmt: skip


def test_headers_with_a_lone_surrogate_are_unusable_not_a_crash_in_the_sink() -> None:
    headers, problem = headers_from_json(b'{"trace": "\\ud800"}')
    assert headers == {}
    assert problem is not None
    assert "lone surrogate" in problem
    assert headers_from_json(b"[1]") == ({}, "headers must be a JSON object")
    assert headers_from_json(b"{") == ({}, "headers are not valid JSON")
