"""The `nats` sink itself: publishing a call's events with a reply subject each, then waiting once
for all their PubAcks (see the package's docstring for what an acknowledgement means)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from outbox_relay.connectors.sinks.nats.config import NatsSinkConfig, redact_server
from outbox_relay.connectors.sinks.nats.connection import close_link, open_link
from outbox_relay.connectors.sinks.nats.outcomes import explain
from outbox_relay.connectors.sinks.nats.pending import UNSETTLED, Call, Link
from outbox_relay.connectors.sinks.nats.subjects import subject_problem
from outbox_relay.events import LEASE_ENDED, Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink, SinkFeatures
from outbox_relay.logs import get_logger
from outbox_relay.secrets import scrubber
from outbox_relay.templates import Template

# Publishing writes into nats-py's buffer without a round trip; a break every this many messages
# lets PubAcks be read (and /healthz answered) while a large call is still being written.
_YIELD_EVERY = 256
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # what nats-py accepts as a header key


def message_headers(event: OutboxEvent, stream: str) -> dict[str, str] | Failure:
    """The headers of the event's message, or the permanent failure of an event whose headers
    NATS cannot carry. `Nats-Msg-Id` is the event id: JetStream drops a repeat within the
    stream's duplicate window."""
    headers = event.standard_headers()
    bad = next((name for name in headers if not _HEADER_NAME.match(name)), None)
    if bad is not None:
        return Failure(
            f"not published: header name {bad!r} cannot be carried by NATS "
            "(letters, digits and !#$%&'*+-.^_`|~ only)",
            permanent=True,
        )
    headers["Nats-Msg-Id"] = event.event_id
    headers["Nats-Expected-Stream"] = stream
    headers["Content-Type"] = event.content_type
    return headers


class NatsSink(Sink):
    kind = "nats"
    #: JetStream drops a repeat of a Nats-Msg-Id (the event id) within the stream's duplicate
    #: window; concurrent PubAcks come back in any order, so a call's order is not kept.
    features = SinkFeatures(dedupes_by_id=True)

    def __init__(self, config: NatsSinkConfig) -> None:
        self.config = config
        self._subject = Template(config.subject, "subject")
        for server in config.servers:
            scrubber.remember_from(server)
        self._display_servers = [redact_server(server) for server in config.servers]
        self._link: Link | None = None
        self._connect_lock = asyncio.Lock()
        self._log = get_logger(sink="nats", servers=",".join(self._display_servers), stream=config.stream)

    # --- Sink ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._ensure_link()

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        """Publish every event with a reply subject, then wait once for all their PubAcks.

        Returns None for an event only when JetStream answered with a PubAck (a `duplicate` one
        included: the stream has the message). Raises ConnectorError when no connection can be
        opened; while nats-py is reconnecting, every event is a transient failure."""
        if not events:
            return []
        link = await self._ensure_link()
        if not link.client.is_connected:
            failure = Failure("not published: not connected to NATS (reconnecting)", transient=True)
            return [failure] * len(events)
        call = Call([UNSETTLED] * len(events), asyncio.get_running_loop().create_future())
        tokens = await self._send_all(link, call, events)
        call.sealed = True
        timeout = self.config.ack_timeout
        if call.remaining:
            await asyncio.wait((call.done,), timeout=timeout)
        if call.remaining:
            connected = "" if link.client.is_connected else " (connection to NATS lost)"
            failure = Failure(
                f"no PubAck from JetStream within {timeout:g}s (ack_timeout){connected}", transient=True
            )
            link.fail_still_waiting(tokens, failure)
        return call.outcomes()

    async def check(self) -> None:
        """Connect, check (or create, with `declare: true`) the stream, and disconnect."""
        await close_link(await self._open(), self._log)

    async def close(self) -> None:
        """Every publish call already waited for its PubAcks; close flushes and disconnects."""
        link, self._link = self._link, None
        if link is not None:
            await close_link(link, self._log)

    def describe(self) -> dict[str, object]:
        config = self.config
        return {
            "servers": self._display_servers,
            "subject": config.subject,
            "stream": config.stream,
            "declare": config.declare,
            "stream_subjects": config.stream_subjects(),
            "duplicate_window": config.duplicate_window,
            "ack_timeout": config.ack_timeout,
            "connect_timeout": config.connect_timeout,
            "dedupe_header": "Nats-Msg-Id = event_id",
        }

    # --- publishing ---------------------------------------------------------------------------

    async def _send_all(self, link: Link, call: Call, events: Sequence[OutboxEvent]) -> list[str]:
        """Publish each event with a reply subject of its own; the reply tokens of the events now
        waiting for a PubAck. An event that cannot be sent gets its failure in `call` at once."""
        from nats import errors as nats_errors

        refused = (nats_errors.MaxPayloadError, nats_errors.BadSubjectError, nats_errors.BadHeaderError)
        render, stream = self._subject.render, self.config.stream
        tokens: list[str] = []
        for index, event in enumerate(events):
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if not self.may_send():
                call.results[index] = LEASE_ENDED
                continue
            subject = render(event)
            problem = subject_problem(subject)
            headers = (
                message_headers(event, stream)
                if problem is None
                else Failure(f"not published: {problem}", permanent=True)
            )
            if isinstance(headers, Failure):
                call.results[index] = headers
                continue
            token = str(next(link.tokens))
            failure = await _send(link, event, subject, link.reply_prefix + token, headers, refused)
            if failure is not None:
                call.results[index] = failure
                continue
            link.waiting[token] = (call, index, subject)
            call.remaining += 1
            tokens.append(token)
        return tokens

    # --- connection ---------------------------------------------------------------------------

    async def _ensure_link(self) -> Link:
        link = self._link
        if link is not None and not link.client.is_closed:
            return link
        async with self._connect_lock:
            link = self._link
            if link is not None and not link.client.is_closed:
                return link
            self._link = await self._open()
            self._log.info("connected to NATS")
            return self._link

    async def _open(self) -> Link:
        return await open_link(self.config, ",".join(self._display_servers), self._log)


async def _send(
    link: Link,
    event: OutboxEvent,
    subject: str,
    reply: str,
    headers: dict[str, str],
    refused: tuple[type[Exception], ...],
) -> Failure | None:
    """Hand one message to the client; the failure when it would not take it (`refused`: errors
    about the message itself, permanent)."""
    try:
        await link.client.publish(subject, event.payload, reply=reply, headers=headers)
    except refused as exc:
        return Failure(f"not published on {subject!r}: {explain(exc)}", permanent=True)
    except Exception as exc:
        return Failure(f"not published on {subject!r}: {explain(exc)}", transient=True)
    return None
