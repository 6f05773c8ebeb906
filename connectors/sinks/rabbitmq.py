"""Sink `rabbitmq`: publishes every event to a RabbitMQ exchange with publisher confirms (pika).

An acknowledgement is a publisher confirm (`basic.ack`) from the broker for that message: RabbitMQ
has routed it to every queue bound for it and, for the durable queues among them (the message is
persistent), written it to disk or to a quorum of replicas. A `basic.nack`, a message returned as
unroutable (`mandatory: true`, the default), a confirm that does not arrive within
`confirm_timeout`, and a connection or channel lost before the confirm are all failures: the
pipeline retries them, so an unconfirmed event is never marked published.

Confirms are pipelined: one call publishes all of its events, then waits once for their confirms
(RabbitMQ acknowledges several delivery tags at a time with `multiple`), instead of one round trip
per message. The connection is pika's asyncio adapter on the relay's own event loop: publishing
only writes frames into a buffer and every callback runs on the loop, so there is no thread and
nothing that blocks.

With `exchange_type: x-consistent-hash` (plugin `rabbitmq_consistent_hash_exchange`) the routing
key defaults to the aggregate id: bind N queues with a weight as binding key (for example `"1"`
each); the exchange hashes the aggregate id, so every aggregate sticks to one queue and its events
stay in order there, while the aggregates spread over the N queues (and their consumers).

`pika` is imported inside methods only, so that a config naming this sink validates (and `check`
can say which extra to install) on an installation without the `rabbitmq` extra.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal
from urllib.parse import parse_qsl

from pydantic import Field, field_validator, model_validator

from outbox_relay.durations import Duration
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Delivered, DeliveryReader, Sink
from outbox_relay.logs import get_logger
from outbox_relay.registry import ConnectorConfig, SinkPlugin
from outbox_relay.secrets import parse_url_setting, redact_url, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, Template, check_template

ExchangeType = Literal["topic", "direct", "fanout", "headers", "x-consistent-hash"]

DEFAULT_ROUTING_KEY = "{aggregate_type}.{event_type}"
# The consistent-hash exchange hashes the routing key: the aggregate id keeps an aggregate on one queue.
CONSISTENT_HASH_ROUTING_KEY = "{aggregate_id}"


# Connection settings that the sink's own keys control; a second spelling in the URL would make
# the effective value ambiguous.
_OWNED_URL_OPTIONS: dict[str, str] = {
    "heartbeat": "use heartbeat",
    "socket_timeout": "use connect_timeout",
    "stack_timeout": "use connect_timeout",
    "blocked_connection_timeout": "use confirm_timeout",
    "connection_attempts": "the relay reconnects by itself, with backoff",
    "retry_delay": "the relay reconnects by itself, with backoff",
}

_MAX_SHORTSTR = 255  # AMQP short strings (routing keys, exchange names) are at most 255 bytes
_CLOSE_TIMEOUT_S = 5.0
# pika encodes a message in ~50 us of pure Python on the event loop; a break every this many
# messages keeps a large call from stalling the loop (fetch, acks, /healthz) for long, and lets
# confirms be read while the rest of the call is still being written.
_YIELD_EVERY = 128
_REPLY_NOT_FOUND = 404
_REPLY_PRECONDITION_FAILED = 406
_REPLY_ACCESS_REFUSED = 403
_REPLY_COMMAND_INVALID = 503


class RabbitMQSinkConfig(ConnectorConfig):
    type: Literal["rabbitmq"]
    url: str = Field(
        min_length=1,
        description="amqp://user:password@host:5672/vhost (or amqps://); the password is never shown.",
    )
    exchange: str = Field(
        default="outbox",
        max_length=_MAX_SHORTSTR,
        description='Exchange to publish to; "" is the default exchange (routing key = queue name).',
    )
    exchange_type: ExchangeType = Field(
        default="topic",
        description="Type used when declaring the exchange. x-consistent-hash needs the "
        'rabbitmq_consistent_hash_exchange plugin; bind N queues with a weight such as "1".',
    )
    routing_key: str = Field(
        default=DEFAULT_ROUTING_KEY,
        description=f"Routing key template; fields: {', '.join(TEMPLATE_FIELDS)}. "
        f"Defaults to {CONSISTENT_HASH_ROUTING_KEY} for x-consistent-hash exchanges.",
    )
    declare: bool = Field(
        default=True,
        description="Declare the exchange (durable) on connect; false only checks that it exists.",
    )
    mandatory: bool = Field(
        default=True,
        description="Treat a message no queue is bound for as a failure instead of letting RabbitMQ drop it.",
    )
    confirm_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="How long a call waits for publisher confirms before its unconfirmed events count as "
        "failed (also the longest a connection may stay blocked by a resource alarm).",
    )
    connect_timeout: Duration = Field(
        default=10.0, gt=0, description="Bound on TCP connect plus the AMQP handshake."
    )
    heartbeat: Duration = Field(
        default=60.0,
        ge=0,
        description="AMQP heartbeat: a dead connection is noticed after about twice this; 0 disables.",
    )

    @model_validator(mode="before")
    @classmethod
    def _routing_key_for_exchange_type(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "routing_key" not in data
            and data.get("exchange_type") == "x-consistent-hash"
        ):
            return {**data, "routing_key": CONSISTENT_HASH_ROUTING_KEY}
        return data

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parts = parse_url_setting(value, ("amqp", "amqps"))
        shown = redact_url(value)
        if not parts.hostname:
            raise ValueError(f"url {shown!r} names no host")
        for name, _ in parse_qsl(parts.query):
            if name in _OWNED_URL_OPTIONS:
                raise ValueError(f"url option {name} cannot be set in the URL: {_OWNED_URL_OPTIONS[name]}")
        return value

    @field_validator("routing_key")
    @classmethod
    def _valid_routing_key(cls, value: str) -> str:
        check_template(value, "routing_key")
        return value

    @field_validator("exchange")
    @classmethod
    def _valid_exchange(cls, value: str) -> str:
        if len(value.encode()) > _MAX_SHORTSTR:
            raise ValueError(f"exchange name is longer than {_MAX_SHORTSTR} bytes")
        return value


class _Call:
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
# A nack says the broker or a queue cannot take messages now (a full queue lasts as long as its
# consumers are away), not that this event is bad: it must not count toward dead-lettering.
_NACKED = Failure(
    "RabbitMQ refused the message (basic.nack: an internal error, or a queue that is full with "
    "overflow: reject-publish)",
    transient=True,
)


@dataclass(slots=True)
class _InFlight:
    call: _Call
    index: int
    event_id: str
    returned: str | None = None


class _Link:
    """One connection and its one confirm-mode channel.

    Delivery tags count per channel, so a reconnect starts a new link; callbacks of a dead link
    touch only that link's state and can never settle an event published on its successor.
    """

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.connection: Any = None
        self.channel: Any = None
        self.next_tag = 1
        self.unconfirmed: dict[int, _InFlight] = {}  # insertion order is delivery-tag order
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
        self.lost(_explain(exc, self.exchange))
        if not self.closed.done():
            self.closed.set_result(None)

    def on_channel_closed(self, _channel: Any, exc: BaseException) -> None:
        self.lost(_explain(exc, self.exchange), refused=_refuses_the_relay(exc))
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
    def _settle(flight: _InFlight, nacked: bool) -> None:
        if nacked:
            result: PublishResult = _NACKED
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
                flight.returned = _unroutable_reason(
                    method.exchange, method.routing_key, method.reply_code, method.reply_text
                )
                return


def _unroutable_reason(exchange: str, routing_key: str, reply_code: int, reply_text: str) -> str:
    if exchange == "":
        where = f"no queue named {routing_key!r} (default exchange)"
    else:
        where = f"no queue bound for routing key {routing_key!r} on exchange {exchange!r}"
    return f"unroutable: {where}; RabbitMQ returned the message ({reply_code} {reply_text})"


class _RelayRefused(ConnectorError):
    """The broker refused the relay's permissions while the link was set up (declaring or
    checking the exchange): a setup problem, not an outage."""


def _refuses_the_relay(exc: BaseException) -> bool:
    """The broker closed the channel with 403 ACCESS_REFUSED: the relay's user may not
    configure, write to or read the exchange (its permissions on the virtual host), whatever
    the event."""
    from pika import exceptions as pe

    return isinstance(exc, pe.ChannelClosedByBroker) and exc.reply_code == _REPLY_ACCESS_REFUSED


def _explain(exc: BaseException, exchange: str) -> str:
    """One sentence for a pika error, secrets scrubbed."""
    from pika import exceptions as pe
    from pika.adapters.utils import connection_workflow as cw

    # pika wraps the real cause up to three times: a socket error in AMQPConnectionError, in the
    # workflow's failure (one error per attempt), in the phase that failed.
    if type(exc) is pe.AMQPConnectionError and exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    if isinstance(exc, cw.AMQPConnectionWorkflowFailed) and exc.exceptions:
        exc = exc.exceptions[-1]
    if isinstance(exc, cw.AMQPConnectorPhaseErrorBase):
        exc = exc.exception
    if isinstance(exc, cw.AMQPConnectorStackTimeout):
        return "RabbitMQ did not complete the connection handshake in time (connect_timeout)"
    if isinstance(exc, pe.ChannelClosedByBroker | pe.ConnectionClosedByBroker):
        code, text = exc.reply_code, exc.reply_text
        scope = "channel" if isinstance(exc, pe.ChannelClosedByBroker) else "connection"
        message = f"RabbitMQ closed the {scope}: {code} {text}"
        if code == _REPLY_NOT_FOUND and "exchange" in text:
            message += f" (declare: false needs the exchange {exchange!r} to exist already)"
        elif code == _REPLY_PRECONDITION_FAILED and "inequivalent arg" in text:
            message += f" (the exchange {exchange!r} exists with other settings; match them or rename it)"
        elif code == _REPLY_COMMAND_INVALID and "x-consistent-hash" in text:
            message += " (enable it: rabbitmq-plugins enable rabbitmq_consistent_hash_exchange)"
        elif code == _REPLY_ACCESS_REFUSED and "Login was refused" in text:
            message = f"RabbitMQ refused the login (wrong user or password): {code} {text}"
        elif code == _REPLY_ACCESS_REFUSED:
            message += " (grant the relay's user configure and write permissions on the exchange)"
    elif isinstance(exc, pe.ProbableAuthenticationError):
        message = f"RabbitMQ refused the login (wrong user or password?): {exc}"
    elif isinstance(exc, pe.ProbableAccessDeniedError):
        message = f"RabbitMQ refused access to the virtual host: {exc}"
    elif isinstance(exc, pe.ConnectionBlockedTimeout):
        message = (
            "RabbitMQ blocked the connection (resource alarm: memory or disk) for longer than confirm_timeout"
        )
    elif isinstance(exc, pe.AMQPHeartbeatTimeout):
        message = "RabbitMQ stopped answering (heartbeat timeout)"
    elif isinstance(exc, pe.StreamLostError):
        message = f"connection to RabbitMQ lost: {exc}"
    elif isinstance(exc, OSError):
        message = f"cannot connect: {exc.strerror or exc}"
    elif isinstance(exc, pe.ConnectionClosedByClient | pe.ChannelClosedByClient):
        message = "connection closed by the relay"
    else:
        text = str(exc).strip()
        message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return scrubber.scrub(message)


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
def _coalescing_connection_class() -> type[Any]:
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


class RabbitMQSink(Sink):
    kind = "rabbitmq"
    keeps_order = True

    def __init__(self, config: RabbitMQSinkConfig) -> None:
        self.config = config
        scrubber.remember_from(config.url)
        self._display_url = scrubber.scrub(config.url)
        self._link: _Link | None = None
        self._connect_lock = asyncio.Lock()
        self._properties: Callable[..., Any] | None = None
        self._routing_key = Template(config.routing_key, "routing_key")
        self._log = get_logger(sink="rabbitmq", url=self._display_url, exchange=config.exchange)

    # --- Sink ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._ensure_link()

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        """Publish every event, then wait once for all their confirms.

        Returns None for an event only when RabbitMQ confirmed it with basic.ack and did not
        return it as unroutable. Raises ConnectorError when no connection can be opened (the
        pipeline retries the whole call, with backoff); a connection lost midway turns the
        unconfirmed events into failures. A channel the broker closes with 403 ACCESS_REFUSED
        (the relay's user may not declare or write to the exchange) fails every event as a
        transient `setup` failure: the relay's permissions, not the events, are wrong.
        """
        if not events:
            return []
        try:
            link = await self._ensure_link()
        except _RelayRefused as exc:
            # The broker answered, refusing the relay's permissions: every event waits for an
            # operator (a setup problem), none is blamed.
            return [Failure(str(exc), transient=True, setup=True)] * len(events)
        loop = asyncio.get_running_loop()
        call = _Call(len(events), loop.create_future())
        tags: list[int] = []
        for start in range(0, len(events), _YIELD_EVERY):
            if start:
                await asyncio.sleep(0)  # let confirms and heartbeats in between chunks
                if not self.may_send():
                    break  # (the rest stay unconfirmed: transient failures)
            # No await inside: the chunk's frames are written in one piece and in order.
            with link.connection.coalesced():
                self._publish_chunk(link, events, start, call, tags)
        config = self.config
        if call.remaining:
            await asyncio.wait((call.done,), timeout=config.confirm_timeout)
        if call.remaining:
            self._confirm_timed_out(link, tags, call)
        return [_as_result(result) for result in call.results]

    def _publish_chunk(
        self, link: _Link, events: Sequence[OutboxEvent], start: int, call: _Call, tags: list[int]
    ) -> None:
        properties = self._properties
        assert properties is not None
        render, exchange, mandatory = self._routing_key.render, self.config.exchange, self.config.mandatory
        channel = link.channel
        for index in range(start, min(start + _YIELD_EVERY, len(events))):
            event = events[index]
            routing_key = render(event)
            # (A key of at most 63 characters fits 255 bytes in any encoding: skip the encode.)
            if len(routing_key) > _MAX_SHORTSTR // 4 and len(routing_key.encode()) > _MAX_SHORTSTR:
                call.results[index] = Failure(
                    f"routing key for this event is longer than {_MAX_SHORTSTR} bytes: {routing_key[:60]}...",
                    permanent=True,
                )
                continue
            if not link.usable:
                call.results[index] = Failure(
                    f"not published: connection to RabbitMQ lost ({link.lost_reason or 'channel closed'})",
                    transient=True,
                    setup=link.refused,
                )
                continue
            tag = link.next_tag
            try:
                channel.basic_publish(
                    exchange,
                    routing_key,
                    event.payload,
                    message_properties(properties, event),
                    mandatory=mandatory,
                )
            except Exception as exc:
                # pika refuses before writing anything (closed channel, unencodable header):
                # no frame left, so no delivery tag was used.
                call.results[index] = Failure(f"not published: {_explain(exc, exchange)}")
                continue
            link.next_tag = tag + 1
            link.unconfirmed[tag] = _InFlight(call, index, event.event_id)
            call.remaining += 1
            tags.append(tag)

    async def check(self) -> None:
        """Connect, check credentials and the exchange (declared, or passively checked with
        `declare: false`), and disconnect. Raises ConnectorError saying what is wrong."""
        link = await self._connect()
        await self._close_link(link)

    async def close(self) -> None:
        """Close the connection. Every publish call has already waited for its confirms, so
        there is nothing left to flush."""
        link, self._link = self._link, None
        if link is not None:
            await self._close_link(link)

    def describe(self) -> dict[str, object]:
        config = self.config
        return {
            "url": self._display_url,
            "exchange": config.exchange,
            "exchange_type": config.exchange_type,
            "routing_key": config.routing_key,
            "declare": config.declare,
            "mandatory": config.mandatory,
            "confirm_timeout": config.confirm_timeout,
            "connect_timeout": config.connect_timeout,
            "heartbeat": config.heartbeat,
            "delivery_mode": "persistent",
        }

    # --- connection ---------------------------------------------------------------------------

    async def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and link.usable:
            return link
        async with self._connect_lock:
            link = self._link
            if link is not None and link.usable:
                return link
            if link is not None:
                self._log.warning("connection to RabbitMQ lost, reconnecting", reason=link.lost_reason)
                await self._close_link(link)
                self._link = None
            self._link = await self._connect()
            self._log.info("connected to RabbitMQ")
            return self._link

    async def _connect(self) -> _Link:
        """Open a connection, a confirm-mode channel and check or declare the exchange."""
        import pika

        config = self.config
        self._properties = pika.BasicProperties
        try:
            parameters = pika.URLParameters(config.url)
        except Exception as exc:
            raise ConnectorError(
                f"cannot use url {self._display_url}: {_explain(exc, config.exchange)}"
            ) from None
        parameters.heartbeat = math.ceil(config.heartbeat)
        parameters.socket_timeout = config.connect_timeout
        parameters.stack_timeout = config.connect_timeout
        parameters.blocked_connection_timeout = config.confirm_timeout
        parameters.connection_attempts = 1
        parameters.client_properties = {"connection_name": "outbox-relay", "product": "outbox-relay"}

        loop = asyncio.get_running_loop()
        link = _Link(config.exchange)
        opened: asyncio.Future[None] = loop.create_future()

        def on_open(_connection: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_connection: Any, exc: BaseException) -> None:
            link.lost(_explain(exc, config.exchange))
            if not opened.done():
                opened.set_exception(ConnectorError(link.lost_reason or "connection failed"))
            if not link.closed.done():
                link.closed.set_result(None)

        link.connection = _coalescing_connection_class()(
            parameters,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=link.on_connection_closed,
            custom_ioloop=loop,
        )
        try:
            try:
                # pika enforces stack_timeout itself; the margin only guards against it not firing.
                await asyncio.wait_for(opened, config.connect_timeout + 5.0)
            except TimeoutError:
                raise ConnectorError(
                    f"no answer within {config.connect_timeout:g}s (connect_timeout)"
                ) from None
            channel = await self._rpc(link, lambda done: link.connection.channel(on_open_callback=done))
            link.channel = channel
            channel.add_on_close_callback(link.on_channel_closed)
            channel.add_on_return_callback(link.on_return)
            await self._rpc(link, lambda done: channel.confirm_delivery(link.on_confirm, callback=done))
            if config.exchange:
                await self._rpc(
                    link,
                    lambda done: channel.exchange_declare(
                        exchange=config.exchange,
                        exchange_type=config.exchange_type,
                        passive=not config.declare,
                        durable=True,
                        callback=done,
                    ),
                )
        except ConnectorError as exc:
            await self._close_link(link)
            refused = _RelayRefused if link.refused else ConnectorError
            raise refused(f"RabbitMQ at {self._display_url}: {exc}") from None
        except BaseException:
            await self._close_link(link)
            raise
        return link

    async def _rpc(self, link: _Link, start: Callable[[Callable[[Any], None]], None]) -> Any:
        """Start one asynchronous pika operation and wait for its completion callback; a lost
        connection or channel fails the wait with its reason."""
        if link.lost_reason is not None:
            raise ConnectorError(link.lost_reason)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(result: Any) -> None:
            if not future.done():
                future.set_result(result)

        link.waiters.add(future)
        try:
            try:
                start(done)
            except Exception as exc:
                raise ConnectorError(_explain(exc, self.config.exchange)) from None
            try:
                return await asyncio.wait_for(future, self.config.connect_timeout)
            except TimeoutError:
                raise ConnectorError(
                    f"RabbitMQ did not answer within {self.config.connect_timeout:g}s"
                ) from None
        finally:
            link.waiters.discard(future)

    async def _close_link(self, link: _Link) -> None:
        connection = link.connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            try:
                connection.close()
            except Exception as exc:
                self._log.warning(
                    "closing the RabbitMQ connection failed", error=_explain(exc, link.exchange)
                )
        if connection is not None:
            try:
                await asyncio.wait_for(asyncio.shield(link.closed), _CLOSE_TIMEOUT_S)
            except TimeoutError:
                self._log.warning("RabbitMQ connection did not close in time")
        link.lost("connection closed by the relay")

    def _confirm_timed_out(self, link: _Link, tags: list[int], call: _Call) -> None:
        """Fail what is still unconfirmed and drop the connection: a broker that lets confirms
        wait this long is blocked or stuck, and the next call starts over on a fresh one."""
        failure = Failure(
            f"RabbitMQ did not confirm the event within {self.config.confirm_timeout:g}s (confirm_timeout)",
            transient=True,
        )
        for tag in tags:
            flight = link.unconfirmed.pop(tag, None)
            if flight is not None:
                call.settle(flight.index, failure)
        if link.usable:
            link.lost("confirms timed out")
            if link.connection is not None and link.connection.is_open:
                link.connection.close()


def _as_result(result: PublishResult | _Unconfirmed) -> PublishResult:
    if isinstance(result, _Unconfirmed):  # every slot is settled by now; kept safe rather than asserted
        return Failure("RabbitMQ did not confirm the event", transient=True)
    return result


class RabbitMQReader(DeliveryReader):
    """Binds a durable queue of its own to the sink's exchange, so that it receives a copy of
    everything routed there from now on, and drains it. The queue outlives a broker restart (an
    exclusive one would vanish with the connection) and expires 10 minutes after its last use.
    Blocking pika in a worker thread: a reader is for drills, not for the relay's event loop."""

    def __init__(self, config: RabbitMQSinkConfig) -> None:
        self._config = config
        self._connection: Any = None
        self._channel: Any = None
        self._queue = f"outbox-relay-drill-{time.time_ns()}"
        self._keys: set[str] = set()

    def _open(self) -> None:
        import pika

        config = self._config
        self._connection = pika.BlockingConnection(pika.URLParameters(config.url))
        self._channel = self._connection.channel()
        if config.declare:
            self._channel.exchange_declare(config.exchange, exchange_type=config.exchange_type, durable=True)
        self._channel.queue_declare(self._queue, durable=True, arguments={"x-expires": 600_000})
        for key in self._keys:
            self._channel.queue_bind(self._queue, config.exchange, key)

    def _setup(self, fields: Sequence[dict[str, str]]) -> None:
        config = self._config
        if config.exchange_type == "topic":
            self._keys = {"#"}
        elif config.exchange_type == "direct":
            self._keys = {config.routing_key.format_map(f) for f in fields}
        elif config.exchange_type == "fanout":
            self._keys = {""}
        else:  # a copy of every message cannot be had from headers or consistent-hash exchanges
            raise ConnectorError(f"drill cannot read back from a {config.exchange_type} exchange")
        self._open()

    async def start(self, fields: Sequence[dict[str, str]]) -> None:
        await asyncio.to_thread(self._setup, fields)

    def _drain(self) -> list[Delivered]:
        if self._connection is None or not self._connection.is_open:
            self._open()  # the broker restarted: the durable queue kept what arrived meanwhile
        delivered: list[Delivered] = []
        last_tag = None
        while len(delivered) < 10_000:
            # Acknowledged only once recorded: a connection lost mid-drain redelivers (a
            # duplicate in the report) instead of losing the message (a false "lost").
            method, properties, _body = self._channel.basic_get(self._queue, auto_ack=False)
            if method is None:
                break
            last_tag = method.delivery_tag
            raw = properties.headers or {}
            headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}
            delivered.append(Delivered(headers, time.time()))
        if last_tag is not None:
            self._channel.basic_ack(last_tag, multiple=True)
        else:
            self._connection.sleep(0.05)  # serves heartbeats while idle
        return delivered

    async def poll(self) -> list[Delivered]:
        try:
            return await asyncio.to_thread(self._drain)
        except Exception:
            self._connection = None  # reconnect on the next poll
            raise

    def _delete(self) -> None:
        if self._connection is None or not self._connection.is_open:
            self._open()
        self._channel.queue_delete(self._queue)
        self._connection.close()

    async def close(self) -> None:
        try:
            await asyncio.to_thread(self._delete)
        except Exception:
            pass  # the queue expires by itself
        self._connection = None


def validate_offline(config: RabbitMQSinkConfig) -> list[tuple[str, str]]:
    """pika's own reading of the url (its URL options), without connecting; and an exchange the
    relay would declare under the `amq.` prefix, which RabbitMQ reserves for itself and refuses
    to declare (ACCESS_REFUSED on every connect). (key, reason) pairs."""
    import pika

    problems: list[tuple[str, str]] = []
    try:
        pika.URLParameters(config.url)
    except (ValueError, TypeError) as exc:
        shown = redact_url(config.url)
        problems.append(("url", f"pika refuses url {shown!r}: {scrubber.scrub(str(exc))}"))
    if config.declare and config.exchange.startswith("amq."):
        problems.append(
            (
                "exchange",
                f"exchange {config.exchange!r} starts with 'amq.', a prefix RabbitMQ reserves: it refuses"
                " to declare such an exchange; name another one, or set declare: false to publish to"
                " one of its predeclared amq.* exchanges",
            )
        )
    return problems


plugin = SinkPlugin(
    type="rabbitmq",
    config=RabbitMQSinkConfig,
    factory=RabbitMQSink,
    requires=("pika",),
    extra="rabbitmq",
    reader=RabbitMQReader,
    validate=validate_offline,
)
