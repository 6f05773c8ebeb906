"""Sink `webhook`: POSTs events to an HTTP endpoint (httpx).

An acknowledgement is a 2xx response to the request that carried the event. What the receiver
did before answering (stored it, queued it, or only looked at it) is up to the receiver: a
receiver that wants no loss answers 2xx only after it stored the event.

`mode: event` (the default) sends one POST per event, up to `max_concurrency` at a time: the body
is the payload bytes unchanged, with `Content-Type` from the event (application/json for JSON
columns) and these headers:

- `Idempotency-Key: <event_id>`: a receiver that remembers the keys it processed can drop the
  duplicates that at-least-once delivery brings;
- `X-Outbox-Event-Id`, `X-Outbox-Event-Type`, `X-Outbox-Aggregate-Type`, `X-Outbox-Aggregate-Id`,
  `X-Outbox-Position`, `X-Outbox-Created-At`: the standard headers;
- `X-Outbox-Header-<name>` for each of the row's own headers; W3C trace context (`traceparent`,
  `tracestate`) is also sent under its own name, so HTTP tracing picks it up.

`mode: batch` sends one POST per call with a JSON array body (`Content-Type: application/json`):
one object per event, shaped like a line of the `file` sink (`event_id`, `event_type`,
`aggregate_type`, `aggregate_id`, `position`, `created_at`, `headers`, `payload`) plus its own
`idempotency_key` (the event id). The request carries `Idempotency-Key: batch-<sha256 of the
event ids>` and `X-Outbox-Batch-Size`. A 2xx acknowledges every event of the batch; a transient
failure fails every event of it. A 4xx is narrowed down: the batch is split in halves that are
sent again, so that only the events the receiver refuses fail permanently (see `_narrow`).

Outcomes: 2xx acks. 408, 425, 429 and 5xx, timeouts and network errors are transient failures
(the receiver as a whole is not taking requests; they never dead-letter an event). A `Retry-After`
on such a response (seconds or an HTTP date) is honoured: no request goes out before then (up to
`max_retry_after`); events of the call that were not sent yet, and calls made meanwhile, fail at
once as transient with the remaining wait in the reason. 401, 403 and 407 refuse the relay itself
(its credentials or permissions), not the event: transient failures marked `setup` (nothing is
dead-lettered; the relay reports a setup problem of the sink and is not ready until the receiver
takes an event again). Other 4xx are permanent failures (the receiver refuses this event: it is
dead-lettered); 3xx and other codes are plain failures.

`httpx` is imported inside methods only, so that a config naming this sink validates (and `check`
can say which extra to install) on an installation without the `webhook` extra.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import Field, ValidationInfo, field_validator

from outbox_relay.connectors.sinks.jsonlines import encode_line
from outbox_relay.durations import Duration
from outbox_relay.events import LEASE_ENDED, Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink
from outbox_relay.logs import get_logger
from outbox_relay.registry import ConnectorConfig, SinkPlugin
from outbox_relay.secrets import is_secret_key, parse_url_setting, redact_url, scrubber

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP header name (RFC 9110 token)
_BAD_VALUE = re.compile(r"[\r\n\x00]")
#: What a static header value may hold: visible ASCII, space and tab (httpx encodes str values as
#: ASCII, and refuses anything else on every request).
_NOT_ASCII_VALUE = re.compile(r"[^\t\x20-\x7e]")
# Static headers whose value is a credential, by name (besides password/secret/token).
_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|auth|signature|credential", re.IGNORECASE)
# Headers the sink sets itself, per request.
_OWNED_HEADERS = {
    "content-type": "it is the event's content type (application/json in batch mode)",
    "content-length": "httpx sets it",
    "transfer-encoding": "httpx sets it",
    "host": "it comes from url",
    "connection": "httpx manages connections",
    "idempotency-key": "it is the event id",
}
_STANDARD = {
    "event_id": "X-Outbox-Event-Id",
    "event_type": "X-Outbox-Event-Type",
    "aggregate_type": "X-Outbox-Aggregate-Type",
    "aggregate_id": "X-Outbox-Aggregate-Id",
    "position": "X-Outbox-Position",
    "created_at": "X-Outbox-Created-At",
}
ROW_HEADER_PREFIX = "X-Outbox-Header-"
_TRACE_CONTEXT = ("traceparent", "tracestate")
_TRANSIENT_STATUS = frozenset({408, 425, 429})
# The receiver (or a proxy before it) refuses the relay's credentials or permissions, not the
# event: every event would get the same answer until an operator fixes the setup.
_REFUSED_STATUS = frozenset({401, 403, 407})
_BODY_EXCERPT = 200


# Static headers whose value is shown (by `check`, in logs): well-known ones that carry no
# credential. Every other header may (x-functions-key, Ocp-Apim-Subscription-Key, X-Access-Key,
# a vendor's own name...): its value is treated as a secret.
_PLAIN_HEADERS = frozenset(
    {
        "accept",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "content-encoding",
        "content-language",
        "user-agent",
        "x-request-id",
        "x-correlation-id",
        "x-source",
        "x-tenant-id",
    }
)


def is_secret_header(name: str) -> bool:
    """A static header whose value must never be shown: any but the well-known plain ones."""
    lowered = name.lower()
    return lowered not in _PLAIN_HEADERS or is_secret_key(name) or bool(_SECRET_HEADER.search(name))


def remember_header_secret(value: str) -> None:
    """Keep a credential header's value out of every text shown, in every form: the whole value,
    the credential after an auth scheme (`Bearer <token>`), the pair inside `Basic <base64>`."""
    scrubber.remember_authorization(value)


def _secret_query_name(name: str) -> bool:
    return is_secret_header(name) or name.lower() in ("key", "sig", "code")


def remember_url_secrets(url: str) -> None:
    """Keep the password and the values of secret-looking query parameters (`?token=`, `?sig=`)
    of a webhook URL out of every text shown."""
    scrubber.remember_from(url)
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return
    if parts.username or parts.password:
        # The Authorization header httpx sends for them, whole, in every form (a receiver may
        # echo the header rather than the pair).
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        scrubber.remember_authorization("Basic " + base64.b64encode(pair.encode()).decode())
    for name, value in query:
        if _secret_query_name(name):
            scrubber.remember(value)


def _has_credentials(url: str) -> bool:
    """The URL carries a user or password (httpx then sends them as HTTP Basic auth)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return bool(parts.username or parts.password)


def redact_webhook_url(url: str) -> str:
    """The URL for display: a password in it, and query values with secret-looking names, masked."""
    url = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.query:
        return url
    query = [
        (k, "***" if _secret_query_name(k) else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


class WebhookSinkConfig(ConnectorConfig):
    type: Literal["webhook"]
    url: str = Field(min_length=1, description="http:// or https:// endpoint the events are POSTed to.")
    mode: Literal["event", "batch"] = Field(
        default="event",
        description="event: one POST per event (body = payload); batch: one POST per call with a JSON array.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Static headers sent with every request, e.g. Authorization: Bearer ${WEBHOOK_TOKEN}. "
        "Values of credential-like names are never shown.",
    )
    timeout: Duration = Field(
        default=10.0, gt=0, description="Bound on one request (connect, send, response): then transient."
    )
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Requests in flight at once (event mode), and connections kept.",
    )
    max_retry_after: Duration = Field(
        default=60.0, ge=0, description="Longest Retry-After honoured; a longer one is shortened to this."
    )

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        remember_url_secrets(value)
        shown = redact_webhook_url(value)
        parts = parse_url_setting(value, ("http", "https"), shown)
        if not parts.hostname:
            raise ValueError(f"url {shown!r} must be an http:// or https:// URL with a host")
        if any(c.isspace() for c in parts.hostname):
            raise ValueError(f"url {shown!r}: the host contains whitespace")
        if parts.port == 0:
            raise ValueError(f"url {shown!r}: port 0 cannot be connected to")
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for name, header in value.items():
            if is_secret_header(name):
                remember_header_secret(header)
        url = info.data.get("url")
        for name in value:
            if name.lower() == "authorization" and url is not None and _has_credentials(url):
                raise ValueError(
                    f"header {name} conflicts with the user and password in url"
                    f" {redact_webhook_url(url)!r}: they would replace it (HTTP Basic auth);"
                    " keep one of them"
                )
        seen: dict[str, str] = {}
        for name in value:
            if name.lower() in seen:
                raise ValueError(
                    f"headers {seen[name.lower()]} and {name} are one header (HTTP header names ignore"
                    " case): both would be sent; keep one"
                )
            seen[name.lower()] = name
        for name, header in value.items():
            if not _TOKEN.match(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if name.lower() in _OWNED_HEADERS:
                raise ValueError(f"header {name} cannot be set here: {_OWNED_HEADERS[name.lower()]}")
            if _BAD_VALUE.search(header):
                raise ValueError(f"header {name} has a line break or NUL in its value")
            if _NOT_ASCII_VALUE.search(header):
                # (The value is not echoed: it may be a credential.)
                raise ValueError(
                    f"header {name} has a character HTTP headers cannot carry in its value: write"
                    " visible ASCII only (percent-encode or base64 other text)"
                )
        return value


def event_headers(event: OutboxEvent) -> dict[str, bytes] | str:
    """The per-event request headers, or why the event's headers cannot be sent over HTTP.
    Values are UTF-8 bytes: HTTP allows octets above 0x7f, so non-ASCII values pass unchanged."""
    created_at = event.created_at_iso
    headers: dict[str, bytes] = {
        "Content-Type": event.content_type.encode(),
        "Idempotency-Key": event.event_id.encode(),
    }
    for name, value in event.standard_headers(created_at).items():
        if _BAD_VALUE.search(value):
            return f"header {name!r} has a line break or NUL in its value, which HTTP cannot carry"
        standard = _STANDARD.get(name)
        if standard is not None:
            headers[standard] = value.encode()
            continue
        if not _TOKEN.match(name):
            return f"header name {name!r} is not a valid HTTP header name"
        headers[ROW_HEADER_PREFIX + name] = value.encode()
        if name.lower() in _TRACE_CONTEXT:
            headers[name.lower()] = value.encode()
    return headers


def batch_body(events: Sequence[OutboxEvent]) -> bytes:
    """A JSON array with one object per event: the file sink's line plus `idempotency_key`."""
    parts = [b'{"idempotency_key":' + orjson.dumps(e.event_id) + b"," + encode_line(e)[1:-1] for e in events]
    return b"[" + b",".join(parts) + b"]"


def batch_key(events: Sequence[OutboxEvent]) -> str:
    """The same events always get the same key, so a re-sent batch is recognisable as such."""
    digest = hashlib.sha256("\n".join(e.event_id for e in events).encode()).hexdigest()
    return f"batch-{digest}"


class WebhookSink(Sink):
    kind = "webhook"

    def __init__(self, config: WebhookSinkConfig) -> None:
        self.config = config
        remember_url_secrets(config.url)
        for name, value in config.headers.items():
            if is_secret_header(name):
                remember_header_secret(value)
        self._display_url = redact_webhook_url(config.url)
        self._client: Any = None
        #: time.monotonic() before which no request goes out (the receiver's Retry-After).
        self._not_before = 0.0
        #: As many as the pool has connections: a request that holds one never waits in httpx
        #: for a connection after it was allowed to go (see `_post`).
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._log = get_logger(sink="webhook", url=self._display_url)

    # --- Sink ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            self._client = self._new_client()

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        if not events:
            return []
        if self._client is None:
            await self.start()
        waiting = self._still_waiting()
        if waiting is not None:
            return [waiting] * len(events)
        if self.config.mode == "batch":
            result, status = await self._post_batch(events)
            return await self._narrow(events, result, status)
        return await self._post_each(events)

    async def check(self) -> None:
        """Send a HEAD request to url: any HTTP answer (even 404 or 405) shows the receiver is
        reachable; a network error or timeout raises ConnectorError."""
        import httpx

        client = self._new_client()
        try:
            async with asyncio.timeout(self.config.timeout):  # (the whole answer, as in _post)
                await client.head(self.config.url)
        except TimeoutError:
            raise ConnectorError(
                f"webhook {self._display_url}: no complete answer within {self.config.timeout:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise ConnectorError(f"webhook {self._display_url}: {_explain(exc)}") from None
        finally:
            await client.aclose()

    async def close(self) -> None:
        """Every call already waited for its responses; close only releases the connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def describe(self) -> dict[str, object]:
        config = self.config
        return {
            "url": self._display_url,
            "mode": config.mode,
            "headers": {k: "***" if is_secret_header(k) else v for k, v in config.headers.items()},
            "timeout": config.timeout,
            "max_concurrency": config.max_concurrency,
            "max_retry_after": config.max_retry_after,
            "idempotency_key": "event_id" if config.mode == "event" else "batch-<sha256 of the event ids>",
            "event_headers": "X-Outbox-* (standard), X-Outbox-Header-<name> (row headers)",
        }

    # --- requests -----------------------------------------------------------------------------

    def _new_client(self) -> Any:
        import httpx

        config = self.config
        return httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(
                max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
            ),
            headers={"User-Agent": "outbox-relay", **config.headers},
            follow_redirects=False,
        )

    def _still_waiting(self) -> Failure | None:
        remaining = self._not_before - time.monotonic()
        if remaining <= 0:
            return None
        return Failure(
            f"not sent: the webhook asked to wait (Retry-After), {remaining:.1f}s left", transient=True
        )

    async def _post_each(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = [None] * len(events)
        pending = iter(range(len(events)))

        async def worker() -> None:
            for index in pending:
                waiting = self._still_waiting()
                if waiting is not None:
                    results[index] = waiting
                    continue
                event = events[index]
                headers = event_headers(event)
                if isinstance(headers, str):
                    results[index] = Failure(f"not sent: {headers}", permanent=True)
                    continue
                results[index], _status = await self._post(event.payload, headers)

        await asyncio.gather(*(worker() for _ in range(min(len(events), self.config.max_concurrency))))
        return results

    async def _post_batch(self, events: Sequence[OutboxEvent]) -> tuple[PublishResult, int | None]:
        headers = {
            "Content-Type": b"application/json",
            "Idempotency-Key": batch_key(events).encode(),
            "X-Outbox-Batch-Size": str(len(events)).encode(),
        }
        return await self._post(batch_body(events), headers)

    async def _narrow(
        self, events: Sequence[OutboxEvent], result: PublishResult, status: int | None
    ) -> list[PublishResult]:
        """The results of a batch, narrowing a refusal (4xx) down to the events it is about.

        A refused batch of several events is split in halves, each sent again: a half that is
        accepted is acknowledged, a refused half is split again, so one refused event costs about
        2*log2(n) more requests and its 999 neighbours are not dead-lettered with it. When both
        halves are refused too, the receiver refuses the batch as such (a bad token, a wrong
        URL), and every event gets the refusal without more requests. A 413 (too large) always
        splits, down to single events if need be."""
        if result is None or not result.permanent or len(events) == 1:
            return [result] * len(events)
        middle = len(events) // 2
        halves = (events[:middle], events[middle:])
        answers = await asyncio.gather(*(self._post_batch(half) for half in halves))
        if status != 413 and all(r is not None and r.permanent for r, _ in answers):
            return [result] * len(events)
        results: list[PublishResult] = []
        for half, (half_result, half_status) in zip(halves, answers, strict=True):
            results += await self._narrow(half, half_result, half_status)
        return results

    async def _post(self, body: bytes, headers: dict[str, bytes]) -> tuple[PublishResult, int | None]:
        """One request: its outcome, and the status code when the receiver answered."""
        import httpx

        try:
            # httpx's timeout bounds each read; a receiver that answers a byte at a time would
            # hold the call (and readiness) forever: the whole request gets the same bound.
            async with asyncio.timeout(self.config.timeout), self._slots:
                # Asked with a connection free for it, right before it goes: a relay that froze
                # while this request waited its turn and woke after its lease ended sends nothing.
                if not self.may_send():
                    return LEASE_ENDED, None
                response = await self._client.post(self.config.url, content=body, headers=headers)
        except (httpx.TimeoutException, TimeoutError):
            return Failure(
                f"webhook {self._display_url}: no response within {self.config.timeout:g}s (timeout)",
                transient=True,
            ), None
        except httpx.HTTPError as exc:
            return Failure(f"webhook {self._display_url}: {_explain(exc)}", transient=True), None
        status = response.status_code
        if 200 <= status < 300:
            return None, status
        reason = f"webhook {self._display_url} answered {status} {response.reason_phrase}".rstrip()
        # Scrubbed before it is cut: a cut must not leave the start of a secret it split unmasked.
        excerpt = scrubber.scrub_shortened(response.text.strip(), _BODY_EXCERPT)
        if excerpt:
            reason += f": {excerpt}"
        if status in _TRANSIENT_STATUS or status >= 500:
            header = response.headers.get("Retry-After")
            wait = retry_after_seconds(header)
            if wait is not None:
                wait = min(wait, self.config.max_retry_after)
                self._not_before = max(self._not_before, time.monotonic() + wait)
                reason += f" (Retry-After: {header.strip()}, waiting {wait:g}s)"
            return Failure(reason, transient=True), status
        if status in _REFUSED_STATUS:
            return Failure(reason, transient=True, setup=True), status
        if 400 <= status < 500:
            return Failure(reason, permanent=True), status
        return Failure(reason), status


def _explain(exc: BaseException) -> str:
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return scrubber.scrub(message)


plugin = SinkPlugin(
    type="webhook",
    config=WebhookSinkConfig,
    factory=WebhookSink,
    requires=("httpx",),
    extra="webhook",
)
