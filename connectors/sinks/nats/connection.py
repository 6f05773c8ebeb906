"""Opening and closing the NATS sink's connection: connect within `connect_timeout`, check (or,
with `declare: true`, create) the JetStream stream, subscribe to the replies the PubAcks come
back on, and hear what the client reports afterwards (errors, disconnects, reconnects).

Reconnecting is nats-py's job (it retries forever, `reconnect_wait` apart): the relay does not
wait between attempts itself, so no retry policy of its own applies here."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from outbox_relay.connectors.sinks.nats.config import NatsSinkConfig
from outbox_relay.connectors.sinks.nats.outcomes import (
    explain,
    permissions_violation,
    reply_result,
    stream_hint,
)
from outbox_relay.connectors.sinks.nats.pending import Link
from outbox_relay.interfaces import ConnectorError

_CLOSE_TIMEOUT_S = 5.0


async def open_link(config: NatsSinkConfig, where: str, log: Any) -> Link:
    """A connection to the servers of `config` (`where`: them, for display) with the stream
    ready and the reply subscription in place. Raises ConnectorError saying what is wrong."""
    from nats.aio.client import Client

    link = Link(Client(), f"_INBOX.relay.{uuid.uuid4().hex}.")
    await _connect(link, config, where, log)
    try:
        await _ensure_stream(link.client, config, log)
        await _subscribe_replies(link, config.stream)
    except ConnectorError as exc:
        await close_link(link, log)
        raise ConnectorError(f"NATS at {where}: {exc}") from None
    except Exception as exc:
        await close_link(link, log)
        raise ConnectorError(f"NATS at {where}: {explain(exc)}{stream_hint(exc)}") from None
    return link


async def _connect(link: Link, config: NatsSinkConfig, where: str, log: Any) -> None:
    client = link.client
    try:
        # nats-py retries the initial connect too (max_reconnect_attempts=-1); the bound is ours.
        await asyncio.wait_for(
            client.connect(
                servers=config.servers,
                name="outbox-relay",
                connect_timeout=config.connect_timeout,
                reconnect_time_wait=config.reconnect_wait,
                max_reconnect_attempts=-1,
                **_callbacks(link, log),
            ),
            config.connect_timeout,
        )
    except TimeoutError:
        await abandon(client)
        raise ConnectorError(
            f"NATS at {where}: no connection within {config.connect_timeout:g}s (connect_timeout)"
        ) from None
    except Exception as exc:
        await abandon(client)
        raise ConnectorError(f"NATS at {where}: {explain(exc)}") from None


def _callbacks(link: Link, log: Any) -> dict[str, Callable[..., Awaitable[None]]]:
    """What the client calls on an error, a disconnect and a reconnect."""
    client = link.client

    async def on_error(exc: Exception) -> None:
        violation = permissions_violation(exc)
        if violation is not None:
            operation, subject = violation
            log.error("NATS refused the relay's user", error=explain(exc))
            link.fail_waiting(
                f"NATS refused the relay's user: {explain(exc)} (grant it {operation} permission "
                f"on {subject!r})",
                setup=True,
                subject=subject if operation == "publish" else None,
            )
            return
        # nats-py reports every failed reconnect attempt; one warning per outage is enough.
        link.errors += 1
        if link.errors == 1:
            log.warning("NATS connection error", error=explain(exc))
        else:
            log.debug("NATS connection error", error=explain(exc), errors=link.errors)

    async def on_disconnected() -> None:
        # Replies to what was published on the lost connection will not come: fail those
        # events now rather than after ack_timeout (a re-send is deduplicated by Nats-Msg-Id).
        violation = permissions_violation(client.last_error)
        if violation is not None:  # (nats-py closes the connection on some versions' wording)
            link.fail_waiting(f"NATS refused the relay's user: {explain(client.last_error)}", setup=True)
        link.fail_waiting("connection to NATS lost before the PubAck")
        if not client.is_closed:
            log.warning("disconnected from NATS, reconnecting")

    async def on_reconnected() -> None:
        log.info("reconnected to NATS", failed_attempts=link.errors)
        link.errors = 0

    return {"error_cb": on_error, "disconnected_cb": on_disconnected, "reconnected_cb": on_reconnected}


async def _ensure_stream(client: Any, config: NatsSinkConfig, log: Any) -> None:
    """Check that the stream exists; create it (file storage) when missing with `declare: true`."""
    from nats.errors import NoRespondersError
    from nats.js.api import StorageType, StreamConfig
    from nats.js.errors import NotFoundError, ServiceUnavailableError

    js = client.jetstream(timeout=config.connect_timeout)
    try:
        await js.stream_info(config.stream)
    except NotFoundError:
        if not config.declare:
            raise ConnectorError(
                f"JetStream stream {config.stream!r} does not exist "
                "(declare: false needs it to exist already; create it or set declare: true)"
            ) from None
        await js.add_stream(
            StreamConfig(
                name=config.stream,
                subjects=config.stream_subjects(),
                duplicate_window=config.duplicate_window,
                storage=StorageType.FILE,
            )
        )
        log.info("created JetStream stream", subjects=config.stream_subjects())
    except (NoRespondersError, ServiceUnavailableError):
        raise ConnectorError("JetStream is not enabled on the server (start nats-server with -js)") from None


async def _subscribe_replies(link: Link, stream: str) -> None:
    """Settle each waiting event when the reply to its message comes back."""

    async def on_reply(msg: Any) -> None:
        waiting = link.waiting.pop(msg.subject[len(link.reply_prefix) :], None)
        if waiting is not None:
            call, index, subject = waiting
            call.settle(index, reply_result(msg.data, msg.headers, subject, stream))

    await link.client.subscribe(link.reply_prefix + "*", cb=on_reply)


async def abandon(client: Any) -> None:
    """Close the client, whatever state it is in, within a bound."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), _CLOSE_TIMEOUT_S)


async def close_link(link: Link, log: Any) -> None:
    """Flush what was published, close, and fail every event still waiting for its PubAck."""
    client = link.client
    try:
        if client.is_connected:
            await asyncio.wait_for(client.flush(), _CLOSE_TIMEOUT_S)
    except Exception as exc:
        log.warning("flushing the NATS connection failed", error=explain(exc))
    await abandon(client)
    link.fail_waiting("connection to NATS closed by the relay")
