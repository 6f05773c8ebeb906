from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from relay.events import iso_utc


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
