"""A holder's term of a lease, and how one ends (the design is told in relay.leadership)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

#: What the holder keeps back from the lease time as its clock margin.
MARGIN_FRACTION = 0.1


@dataclass
class Term:
    """One holder's hold on a lease: its token, and its deadline on this process's monotonic
    clock. `valid()` is what everything that publishes or marks asks, right before it does."""

    table: str
    key: str
    token: int
    deadline: float
    #: The row's expiry (the server's clock) as the holder last saw it: a renewal moves it on
    #: only from there (see relay.leadership.row).
    expiry: datetime
    ended: bool = False

    def valid(self) -> bool:
        return not self.ended and time.monotonic() < self.deadline

    def end(self) -> None:
        self.ended = True


class RivalLease(Exception):
    """Another replica holds this outbox's lease in another lease table (a setup problem)."""


class LeaseLost(Exception):
    """The lease's term ended: another replica may be active now."""
