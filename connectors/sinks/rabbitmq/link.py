"""The `rabbitmq` sink's transport: one connection with its one confirm-mode channel, the
events it waits to confirm, and pika's asyncio connection writing a burst of frames at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

from outbox_relay.connectors.sinks.rabbitmq.errors import (
    NACKED,
    explain,
    refuses_the_relay,
    unroutable_reason,
)
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError


class Call:
    """The events of one `publish` call that wait for their confirms."""

    __slots__ = ("done", "remaining", "results")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.results: list[PublishResult | _Unconfirmed] = [_UNCONFIRMED] * size
        self.remaining = 0
        self.done = done

    def settle(self, index: int, result: PublishResult) -> None:
        if self.results[index] is not _UNCONFIRMED:
            return
        self.results[index] = result
        self.remaining -= 1
        if self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


class _Unconfirmed:
    """Marks a result slot whose confirm has not arrived (yet)."""


_UNCONFIRMED = _Unconfirmed()


@dataclass(slots=True)
class InFlight:
    call: Call
    index: int
    event_id: str
    returned: str | None = None


class Link:
    """One connection and its one confirm-mode channel.

    Delivery tags count per channel, so a reconnect starts a new link; callbacks of a dead link
    touch only that link's state and can never settle an event published on its successor.
    """

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.connection: Any = None
        self.channel: Any = None
        self.next_tag = 1
        self.unconfirmed: dict[int, InFlight] = {}  # insertion order is delivery-tag order
        self.lost_reason: str | None = None
        #: The broker closed the channel refusing the relay's permissions (403 ACCESS_REFUSED).
        self.refused = False
        self.waiters: set[asyncio.Future[Any]] = set()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def usable(self) -> bool:
        return self.lost_reason is None and self.channel is not None and self.channel.is_open

    def lost(self, reason: str, *, refused: bool = False) -> None:
        """The connection or channel is gone: nothing still unconfirmed will ever be confirmed.
        `refused`: the broker closed it refusing the relay's permissions, not for an outage."""
        if self.lost_reason is None:
            self.lost_reason = reason
            self.refused = refused
        failure = Failure(
            f"RabbitMQ did not confirm the event before the connection was lost: {reason}",
            transient=True,
            setup=self.refused,
        )
        unconfirmed, self.unconfirmed = self.unconfirmed, {}
        for flight in unconfirmed.values():
            flight.call.settle(flight.index, failure)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(ConnectorError(reason))
        self.waiters.clear()

    def on_connection_closed(self, _connection: Any, exc: BaseException) -> None:
        self.lost(explain(exc, self.exchange))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_channel_closed(self, _channel: Any, exc: BaseException) -> None:
        self.lost(explain(exc, self.exchange), refused=refuses_the_relay(exc))
        # One channel per connection: without it the connection is of no use, and closing it lets
        # the next call start from a clean connection.
        connection = self.connection
        if connection is not None and connection.is_open:
            connection.close()

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        nacked = method.NAME == "Basic.Nack"
        if method.multiple:
            unconfirmed = self.unconfirmed
            while unconfirmed:
                first = next(iter(unconfirmed))
                if first > tag:
                    break
                self._settle(unconfirmed.pop(first), nacked)
        else:
            flight = self.unconfirmed.pop(tag, None)
            if flight is not None:
                self._settle(flight, nacked)

    @staticmethod
    def _settle(flight: InFlight, nacked: bool) -> None:
        if nacked:
            result: PublishResult = NACKED
        elif flight.returned is not None:
            result = Failure(flight.returned)
        else:
            result = None
        flight.call.settle(flight.index, result)

    def on_return(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        # RabbitMQ sends basic.return before the basic.ack of the same message, and the message
        # carries no delivery tag: it is the oldest unconfirmed, not yet returned message with
        # this message id (event ids are unique among the events in flight).
        message_id = properties.message_id
        for flight in self.unconfirmed.values():
            if flight.event_id == message_id and flight.returned is None:
                flight.returned = unroutable_reason(
                    method.exchange, method.routing_key, method.reply_code, method.reply_text
                )
                return

    def confirms_timed_out(self, tags: list[int], call: Call, confirm_timeout: float) -> None:
        """Fail what of `tags` is still unconfirmed and drop the connection: a broker that lets
        confirms wait `confirm_timeout` is blocked or stuck, and the next call starts over on a
        fresh one."""
        failure = Failure(
            f"RabbitMQ did not confirm the event within {confirm_timeout:g}s (confirm_timeout)",
            transient=True,
        )
        for tag in tags:
            flight = self.unconfirmed.pop(tag, None)
            if flight is not None:
                call.settle(flight.index, failure)
        if self.usable:
            self.lost("confirms timed out")
            if self.connection is not None and self.connection.is_open:
                self.connection.close()


def message_properties(properties: Callable[..., Any], event: OutboxEvent) -> Any:
    """The AMQP properties of an event's message, built with `properties` (pika.BasicProperties):
    persistent, `message_id` = event id, `type` = event type, the standard headers."""
    return properties(
        content_type=event.content_type,
        delivery_mode=2,
        message_id=event.event_id,
        type=event.event_type,
        timestamp=int(event.created_at),
        headers=event.standard_headers(),
    )


@cache
def coalescing_connection_class() -> type[Any]:
    """pika's asyncio connection, writing the frames of a burst of publishes at once.

    pika hands every frame to its transport separately, and the transport sends each with its
    own send(): three system calls and three TCP segments per message, for the relay and for the
    broker. Inside `coalesced()` the frames go through the adapter hook `_adapter_emit_data` into
    a list, written as one piece (in the same order) when the block ends."""
    from pika.adapters.asyncio_connection import AsyncioConnection

    class CoalescingConnection(AsyncioConnection):  # type: ignore[misc]
        _gathered: list[bytes] | None = None

        def _adapter_emit_data(self, data: bytes) -> None:
            if self._gathered is not None:
                self._gathered.append(data)
            else:
                super()._adapter_emit_data(data)

        @contextmanager
        def coalesced(self) -> Iterator[None]:
            gathered: list[bytes] = []
            self._gathered = gathered
            try:
                yield
            finally:
                self._gathered = None
                if gathered and self._transport is not None:
                    super()._adapter_emit_data(b"".join(gathered))

    return CoalescingConnection


def as_result(result: PublishResult | _Unconfirmed) -> PublishResult:
    if isinstance(result, _Unconfirmed):  # every slot is settled by now; kept safe rather than asserted
        return Failure("RabbitMQ did not confirm the event", transient=True)
    return result
