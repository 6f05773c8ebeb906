"""The `rabbitmq` sink: publishing with pipelined publisher confirms over its link, and the
link's lifecycle (connect on demand, reconnect after a loss, close)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from outbox_relay.connectors.sinks.rabbitmq.config import MAX_SHORTSTR, RabbitMQSinkConfig
from outbox_relay.connectors.sinks.rabbitmq.connection import Connector
from outbox_relay.connectors.sinks.rabbitmq.errors import RelayRefused, explain
from outbox_relay.connectors.sinks.rabbitmq.link import Call, InFlight, Link, as_result, message_properties
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink, SinkFeatures
from outbox_relay.logs import get_logger
from outbox_relay.secrets import scrubber
from outbox_relay.templates import Template

# pika encodes a message in ~50 us of pure Python on the event loop; a break every this many
# messages keeps a large call from stalling the loop (fetch, acks, /healthz) for long, and lets
# confirms be read while the rest of the call is still being written.
_YIELD_EVERY = 128


class RabbitMQSink(Sink):
    """Contract (on top of `Sink`): see `publish`. One connection at a time, opened on demand
    (one caller connects, the others wait for it); `close` has nothing to flush, as every
    publish call waits for its own confirms."""

    kind = "rabbitmq"
    features = SinkFeatures(keeps_order=True)

    def __init__(self, config: RabbitMQSinkConfig) -> None:
        self.config = config
        scrubber.remember_from(config.url)
        self._display_url = scrubber.scrub(config.url)
        self._link: Link | None = None
        self._connect_lock = asyncio.Lock()
        self._properties: Callable[..., Any] | None = None
        self._routing_key = Template(config.routing_key, "routing_key")
        self._log = get_logger(sink="rabbitmq", url=self._display_url, exchange=config.exchange)
        self._connector = Connector(config, self._display_url, self._log)

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
        except RelayRefused as exc:
            # The broker answered, refusing the relay's permissions: every event waits for an
            # operator (a setup problem), none is blamed.
            return [Failure(str(exc), transient=True, setup=True)] * len(events)
        loop = asyncio.get_running_loop()
        call = Call(len(events), loop.create_future())
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
            link.confirms_timed_out(tags, call, config.confirm_timeout)
        return [as_result(result) for result in call.results]

    def _publish_chunk(
        self, link: Link, events: Sequence[OutboxEvent], start: int, call: Call, tags: list[int]
    ) -> None:
        properties = self._properties
        assert properties is not None
        render, exchange, mandatory = self._routing_key.render, self.config.exchange, self.config.mandatory
        channel = link.channel
        for index in range(start, min(start + _YIELD_EVERY, len(events))):
            event = events[index]
            routing_key = render(event)
            # (A key of at most 63 characters fits 255 bytes in any encoding: skip the encode.)
            if len(routing_key) > MAX_SHORTSTR // 4 and len(routing_key.encode()) > MAX_SHORTSTR:
                call.results[index] = Failure(
                    f"routing key for this event is longer than {MAX_SHORTSTR} bytes: {routing_key[:60]}...",
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
                call.results[index] = Failure(f"not published: {explain(exc, exchange)}")
                continue
            link.next_tag = tag + 1
            link.unconfirmed[tag] = InFlight(call, index, event.event_id)
            call.remaining += 1
            tags.append(tag)

    async def check(self) -> None:
        """Connect, check credentials and the exchange (declared, or passively checked with
        `declare: false`), and disconnect. Raises ConnectorError saying what is wrong."""
        link = await self._connect()
        await self._connector.close(link)

    async def close(self) -> None:
        """Close the connection. Every publish call has already waited for its confirms, so
        there is nothing left to flush."""
        link, self._link = self._link, None
        if link is not None:
            await self._connector.close(link)

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

    async def _ensure_link(self) -> Link:
        link = self._link
        if link is not None and link.usable:
            return link
        async with self._connect_lock:
            link = self._link
            if link is not None and link.usable:
                return link
            if link is not None:
                self._log.warning("connection to RabbitMQ lost, reconnecting", reason=link.lost_reason)
                await self._connector.close(link)
                self._link = None
            self._link = await self._connect()
            self._log.info("connected to RabbitMQ")
            return self._link

    async def _connect(self) -> Link:
        import pika

        self._properties = pika.BasicProperties
        return await self._connector.connect()
