"""Opening and closing the `rabbitmq` sink's link: a connection, a confirm-mode channel and the
exchange declared (or checked), each step bounded by connect_timeout."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from outbox_relay.connectors.sinks.rabbitmq.config import RabbitMQSinkConfig
from outbox_relay.connectors.sinks.rabbitmq.errors import RelayRefused, explain
from outbox_relay.connectors.sinks.rabbitmq.link import Link, coalescing_connection_class
from outbox_relay.interfaces import ConnectorError

_CLOSE_TIMEOUT_S = 5.0
# pika enforces stack_timeout itself; this margin over connect_timeout only guards against it
# not firing.
_OPEN_MARGIN_S = 5.0


class Connector:
    """Opens links to the broker of one sink config and closes them.

    Contract: `connect` returns a usable link or raises ConnectorError saying what is wrong
    (`RelayRefused` when the broker refused the relay's permissions), and leaves nothing open
    when it raises; `close` returns once the connection is closed, or after a bounded wait."""

    def __init__(self, config: RabbitMQSinkConfig, display_url: str, log: Any) -> None:
        self._config = config
        self._display_url = display_url
        self._log = log

    async def connect(self) -> Link:
        """Open a connection, a confirm-mode channel and check or declare the exchange."""
        parameters = self._parameters()
        link = Link(self._config.exchange)
        try:
            await self._open_connection(link, parameters)
            await self._open_channel(link)
        except ConnectorError as exc:
            await self.close(link)
            refused = RelayRefused if link.refused else ConnectorError
            raise refused(f"RabbitMQ at {self._display_url}: {exc}") from None
        except BaseException:
            await self.close(link)
            raise
        return link

    def _parameters(self) -> Any:
        """pika's connection parameters: the url, with the timeouts the sink's settings own."""
        import pika

        config = self._config
        try:
            parameters = pika.URLParameters(config.url)
        except Exception as exc:
            raise ConnectorError(
                f"cannot use url {self._display_url}: {explain(exc, config.exchange)}"
            ) from None
        parameters.heartbeat = math.ceil(config.heartbeat)
        parameters.socket_timeout = config.connect_timeout
        parameters.stack_timeout = config.connect_timeout
        parameters.blocked_connection_timeout = config.confirm_timeout
        parameters.connection_attempts = 1
        parameters.client_properties = {"connection_name": "outbox-relay", "product": "outbox-relay"}
        return parameters

    async def _open_connection(self, link: Link, parameters: Any) -> None:
        config = self._config
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_open(_connection: Any) -> None:
            if not opened.done():
                opened.set_result(None)

        def on_open_error(_connection: Any, exc: BaseException) -> None:
            link.lost(explain(exc, config.exchange))
            if not opened.done():
                opened.set_exception(ConnectorError(link.lost_reason or "connection failed"))
            if not link.closed.done():
                link.closed.set_result(None)

        link.connection = coalescing_connection_class()(
            parameters,
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=link.on_connection_closed,
            custom_ioloop=asyncio.get_running_loop(),
        )
        try:
            await asyncio.wait_for(opened, config.connect_timeout + _OPEN_MARGIN_S)
        except TimeoutError:
            raise ConnectorError(f"no answer within {config.connect_timeout:g}s (connect_timeout)") from None

    async def _open_channel(self, link: Link) -> None:
        """The link's confirm-mode channel, and the exchange declared or (declare: false) checked."""
        config = self._config
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

    async def _rpc(self, link: Link, start: Callable[[Callable[[Any], None]], None]) -> Any:
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
                raise ConnectorError(explain(exc, self._config.exchange)) from None
            try:
                return await asyncio.wait_for(future, self._config.connect_timeout)
            except TimeoutError:
                raise ConnectorError(
                    f"RabbitMQ did not answer within {self._config.connect_timeout:g}s"
                ) from None
        finally:
            link.waiters.discard(future)

    async def close(self, link: Link) -> None:
        """Close the link's connection and wait (bounded) until pika says it is closed."""
        connection = link.connection
        if connection is not None and not (connection.is_closed or connection.is_closing):
            try:
                connection.close()
            except Exception as exc:
                self._log.warning("closing the RabbitMQ connection failed", error=explain(exc, link.exchange))
        if connection is not None:
            try:
                await asyncio.wait_for(asyncio.shield(link.closed), _CLOSE_TIMEOUT_S)
            except TimeoutError:
                self._log.warning("RabbitMQ connection did not close in time")
        link.lost("connection closed by the relay")
