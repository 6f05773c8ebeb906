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

The parts: `config` (the YAML), `redaction` (what is a credential, kept out of every text),
`messages` (headers and bodies, pure), `outcomes` (what an answer means, the Retry-After pause),
`sink` (the requests).
"""

from __future__ import annotations

from outbox_relay.connectors.sinks.webhook.config import WebhookSinkConfig
from outbox_relay.connectors.sinks.webhook.messages import (
    ROW_HEADER_PREFIX,
    batch_body,
    batch_key,
    event_headers,
)
from outbox_relay.connectors.sinks.webhook.outcomes import retry_after_seconds
from outbox_relay.connectors.sinks.webhook.redaction import (
    is_secret_header,
    redact_webhook_url,
    remember_header_secret,
    remember_url_secrets,
)
from outbox_relay.connectors.sinks.webhook.sink import WebhookSink
from outbox_relay.registry import SinkPlugin

__all__ = [
    "ROW_HEADER_PREFIX",
    "WebhookSink",
    "WebhookSinkConfig",
    "batch_body",
    "batch_key",
    "event_headers",
    "is_secret_header",
    "plugin",
    "redact_webhook_url",
    "remember_header_secret",
    "remember_url_secrets",
    "retry_after_seconds",
]

plugin = SinkPlugin(
    type="webhook",
    config=WebhookSinkConfig,
    factory=WebhookSink,
    requires=("httpx",),
    extra="webhook",
)
