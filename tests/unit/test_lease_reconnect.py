"""How a standby retries the database: never so slowly that it misses a takeover."""

from __future__ import annotations

import pytest

from outbox_relay.leadership.lease import reconnect_policy


@pytest.mark.parametrize(("lease_time", "cap"), [(2.0, 1.0), (6.0, 3.0), (15.0, 5.0), (60.0, 5.0)])
def test_a_standby_looks_again_within_half_the_lease_time_however_long_the_outage(
    lease_time: float, cap: float
) -> None:
    policy = reconnect_policy(lease_time)
    assert policy.ceiling(1000) == cap
    assert policy.initial <= cap


def test_the_first_retries_come_fast_even_for_a_short_lease() -> None:
    assert reconnect_policy(1.0).ceiling(1) == pytest.approx(0.1)
    assert reconnect_policy(30.0).ceiling(1) == 0.5
