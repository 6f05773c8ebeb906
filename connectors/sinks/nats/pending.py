"""What waits for a PubAck: the events of one publish call (`Call`) and, per connection, every
message published with a reply subject and not answered yet (`Link`)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

from outbox_relay.events import Failure, PublishResult


class Unsettled:
    """Marks a slot still waiting for its PubAck."""


UNSETTLED = Unsettled()


@dataclass(slots=True)
class Call:
    """The events of one publish call still waiting for their PubAck."""

    results: list[PublishResult | Unsettled]
    done: asyncio.Future[None]
    remaining: int = 0
    #: Every event of the call was handed to the client. Until then PubAcks may catch up with
    #: the events sent so far (the loop yields, a big message waits for a flush), and that
    #: must not end the wait for the events not sent yet.
    sealed: bool = False

    def settle(self, index: int, result: PublishResult) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.sealed and self.remaining == 0 and not self.done.done():
            self.done.set_result(None)

    def outcomes(self) -> list[PublishResult]:
        """The results; a slot never settled is never reported as acknowledged."""
        unsettled = Failure("no PubAck from JetStream", transient=True)
        return [unsettled if isinstance(r, Unsettled) else r for r in self.results]


@dataclass(slots=True)
class Link:
    """One connection with the reply subscription its PubAcks come back on."""

    client: Any
    reply_prefix: str
    waiting: dict[str, tuple[Call, int, str]] = field(default_factory=dict)
    tokens: itertools.count[int] = field(default_factory=itertools.count)
    #: Connection errors since the last successful (re)connect: only the first one is a warning.
    errors: int = 0

    def fail_waiting(self, reason: str, *, setup: bool = False, subject: str | None = None) -> None:
        """Settle every event still waiting for a PubAck (on `subject` only, when given) as a
        transient failure; `setup`: the server refused the relay's permissions for it."""
        failure = Failure(reason, transient=True, setup=setup)
        if subject is None:
            waiting, self.waiting = self.waiting, {}
        else:
            waiting = {token: entry for token, entry in self.waiting.items() if entry[2] == subject}
            for token in waiting:
                del self.waiting[token]
        for call, index, _subject in waiting.values():
            call.settle(index, failure)

    def fail_still_waiting(self, tokens: list[str], failure: Failure) -> None:
        """Settle the events of these reply tokens that are still waiting with `failure`."""
        for token in tokens:
            waiting = self.waiting.pop(token, None)
            if waiting is not None:
                waiting[0].settle(waiting[1], failure)
