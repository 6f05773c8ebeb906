"""The event as it travels from a source to a sink, and the per-event outcome of a publish."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import orjson

from outbox_relay import json_span

# The formatted second of the last call: every event of a batch (or a burst) shares it, and
# formatting a datetime costs as much as the rest of building a message's headers.
_second_formatted: tuple[int, str] = (-1, "")


def iso_utc(timestamp: float) -> str:
    """`datetime.fromtimestamp(timestamp, UTC).isoformat()`, at half the cost."""
    global _second_formatted
    whole = int(timestamp // 1)
    micro = round((timestamp - whole) * 1e6)
    if micro == 1_000_000:
        whole, micro = whole + 1, 0
    second, prefix = _second_formatted
    if second != whole:
        prefix = datetime.fromtimestamp(whole, UTC).isoformat()[:-6]  # without "+00:00"
        _second_formatted = (whole, prefix)
    return f"{prefix}.{micro:06d}+00:00" if micro else f"{prefix}+00:00"


# The range of times a message header can carry (Python's datetime: years 1 to 9999).
EARLIEST = datetime(1, 1, 2, tzinfo=UTC).timestamp()
LATEST = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def checked_time(epoch: float | None, fallback: float) -> tuple[float, str | None]:
    """A row's `created_at` as seconds since the epoch, and why it is unusable (None when it is
    usable). NULL means "not recorded": the fallback serves. 'infinity' or a year past 9999 has
    no ISO form for the `created_at` header, so the row is a defect (dead-lettered, not sent)."""
    if epoch is None:
        return fallback, None
    if not EARLIEST <= epoch <= LATEST:  # (also false for NaN)
        return fallback, f"created_at is not a representable time ({epoch} seconds since 1970)"
    return epoch, None


@dataclass(slots=True, eq=False)
class OutboxEvent:
    """One outbox row (or emitted message) on its way to the broker.

    `position` is the source's order: the `position` column in polling mode, a commit-ordered
    sequence in logical-replication mode. Events of one aggregate are published in `position`
    order. `payload` is the body exactly as stored (JSON text stays JSON text). `created_at` is
    seconds since the epoch, used for lag and end-to-end latency. `ack_token` is opaque to
    everything but the source that produced the event.
    """

    position: int
    event_id: str
    aggregate_type: str
    aggregate_id: str | None
    event_type: str
    payload: bytes
    headers: dict[str, str]
    created_at: float
    ack_token: Any = None
    #: What the payload bytes are: application/json (json/jsonb columns, emitted JSON messages),
    #: text/plain or application/octet-stream for other column types.
    content_type: str = "application/json"
    # Set by the source when the row could not be turned into a publishable event (for example a
    # NULL aggregate id in a mapped table): the pipeline retries and reports it instead of dropping it.
    defect: str | None = None
    attempts: int = field(default=0)
    #: Failures that were the event's own (not transient), and when the first failure happened.
    rejections: int = field(default=0)
    first_failed_at: float | None = None
    #: Whether the broker took other events while this one failed (in the same call, or since
    #: its first failure): it fails on its own, not with the broker as a whole.
    failed_amid_successes: bool = field(default=False)

    @property
    def created_at_iso(self) -> str:
        return iso_utc(self.created_at)

    @property
    def lane_key(self) -> tuple[str, str | None]:
        """Events with equal lane keys are published strictly one after another, in order."""
        return (self.aggregate_type, self.aggregate_id)

    def standard_headers(self, created_at_iso: str | None = None) -> dict[str, str]:
        """The headers every message carries (docs/concepts/payloads.md), the row's own headers
        first so that ours win on a name clash: a row cannot forge `event_id` or `position`."""
        merged = dict(self.headers)
        merged["event_id"] = self.event_id
        merged["event_type"] = self.event_type
        merged["aggregate_type"] = self.aggregate_type
        merged["aggregate_id"] = "" if self.aggregate_id is None else self.aggregate_id
        merged["position"] = str(self.position)
        merged["created_at"] = created_at_iso or self.created_at_iso
        return merged

    def template_fields(self) -> dict[str, str]:
        """Fields available to topic / routing-key templates such as `{aggregate_type}.events`."""
        return {name: value(self) for name, value in FIELD_VALUES.items()}


def _aggregate_id(event: OutboxEvent) -> str:
    return "" if event.aggregate_id is None else event.aggregate_id


def _position(event: OutboxEvent) -> str:
    return str(event.position)


#: The fields of an event that templates (relay.templates) and readers may name, and how each is
#: read as text. (Here, with the event, so that the templates depend on events and not back.)
FIELD_VALUES: dict[str, Callable[[OutboxEvent], str]] = {
    "event_id": attrgetter("event_id"),
    "event_type": attrgetter("event_type"),
    "aggregate_type": attrgetter("aggregate_type"),
    "aggregate_id": _aggregate_id,
    "position": _position,
}


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one event was not acknowledged by the broker.

    `permanent`: retrying the same event cannot help (too large, unauthorized, invalid); it is
    dead-lettered at once (or, with `on_poison: block`, retried until an operator acts).
    `transient`: the broker as a whole did not answer (timeout, lost connection); such failures
    say nothing about the event, so they never count toward dead-lettering it: an outage must
    not empty the outbox into the dead-letter table.
    `setup`: the broker refused the relay itself, not the event (its credentials or its
    permissions: HTTP 401/403, an ACL, a SASL failure; or no stream takes the subject). A
    mistake in the setup that waits for an operator: set with `transient` (nothing is
    dead-lettered for it: a revoked permission must not empty the outbox either), and reported
    as a setup problem of the sink (relay.problems) until the broker takes an event again.
    """

    reason: str
    permanent: bool = False
    transient: bool = False
    setup: bool = False


# A sink returns, per event and in the order given, None for "acknowledged by the broker" or a
# Failure. None keeps the common all-acked case free of per-event allocations.
PublishResult = Failure | None

#: The result of an event a sink did not send because the relay's lease ended (see `Sink.may_send`).
LEASE_ENDED = Failure("not sent: this relay's lease ended", transient=True)


def member_texts(document: bytes, value: dict[str, Any]) -> dict[str, str]:
    """A parsed JSON object's members as text: a string as its value, anything else (a number,
    true, an object) as written in `document` (its JSON text), so that a number keeps its
    digits (123456789012345678901234567890, 1.10) instead of passing through a float."""
    texts: dict[str, str] = {}
    spans: dict[str, tuple[int, int]] | None = None
    for name, item in value.items():
        if isinstance(item, str):
            texts[name] = item
            continue
        if spans is None:
            spans = json_span.member_spans(document, value.keys())
        start, end = spans[name]
        texts[name] = document[start:end].decode("utf-8", "surrogatepass")
    return texts


def unencodable(texts: Iterable[str]) -> str | None:
    """Why some text cannot go to a broker, or None: JSON can carry a lone surrogate (an escape
    from \\ud800 to \\udfff) that no UTF-8 header or key can hold."""
    for text in texts:
        try:
            text.encode()
        except UnicodeEncodeError:
            return f"{text[:40]!r} holds a lone surrogate escape, which no message can carry"
    return None


def headers_from_json(raw: str | bytes) -> tuple[dict[str, str], str | None]:
    """A row's `headers` JSON object as string headers (non-string values as their JSON text),
    or ({}, why it is unusable)."""
    document = raw.encode() if isinstance(raw, str) else bytes(raw)
    try:  # the common case, fast: orjson read an object of strings (never a lone surrogate)
        quick = orjson.loads(document)
        if isinstance(quick, dict):
            for item in quick.values():  # (a loop: once per row, no all() and generator calls)
                if type(item) is not str:
                    break
            else:
                return quick, None
    except orjson.JSONDecodeError:
        pass
    try:
        value = json_span.parse(document)
    except ValueError:
        return {}, "headers are not valid JSON"
    if not isinstance(value, dict):
        return {}, "headers must be a JSON object"
    headers = member_texts(document, value)
    problem = unencodable([*headers, *headers.values()])
    if problem:
        return {}, f"headers: {problem}"
    return headers, None
