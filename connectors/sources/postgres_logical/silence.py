"""When a replication stream that says nothing is dead, by the rule of PostgreSQL's own logical
replication worker (`wal_receiver_timeout`): at half of the timeout without a frame of any kind
from the server, ask it for a reply (a standby status update with "reply requested" set); past
the whole of it without one, the stream is dead.

A connection held open by a proxy, a NAT or a firewall that stopped forwarding fails nothing: the
relay's status updates are taken and go nowhere, and the server's frames never come. Without
this rule such a stream is waited on for ever (an idle stream looks the same)."""

from __future__ import annotations

import enum


class Due(enum.Enum):
    """What the silence so far calls for."""

    NOTHING = "nothing"
    ASK = "ask"
    DEAD = "dead"


class Silence:
    """How long the server has said nothing, on the monotonic clock the caller passes in
    (`now`). With `timeout` 0 nothing is ever due.

    The stream is dead only once a reply was asked for and half the timeout went by after
    asking, as well as the whole timeout after the last frame: a relay whose window was full
    read nothing for a while, and the frames the server sent meanwhile are still in the socket
    (the caller reads them before it asks what is due)."""

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self._heard = now
        self._asked: float | None = None

    def heard(self, now: float) -> None:
        """A frame came from the server."""
        self._heard = now
        self._asked = None

    def asked(self, now: float) -> None:
        """A reply was asked for."""
        self._asked = now

    def silent_for(self, now: float) -> float:
        return now - self._heard

    def due(self, now: float) -> Due:
        if self.timeout <= 0:
            return Due.NOTHING
        if self._asked is None:
            return Due.ASK if now - self._heard >= self.timeout / 2 else Due.NOTHING
        if now - self._heard >= self.timeout and now - self._asked >= self.timeout / 2:
            return Due.DEAD
        return Due.NOTHING

    def until_due(self, now: float) -> float:
        """Seconds until something may be due (a wait for data must wake up by then)."""
        if self.timeout <= 0:
            return float("inf")
        if self._asked is None:
            at = self._heard + self.timeout / 2
        else:
            at = max(self._heard + self.timeout, self._asked + self.timeout / 2)
        return max(at - now, 0.0)
