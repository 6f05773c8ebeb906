"""The configuration of the `webhook` sink: the URL, the mode, static headers (credentials never
shown), the bounds on a request and on a receiver's Retry-After."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from outbox_relay.connectors.sinks.webhook.messages import BAD_VALUE, HEADER_NAME
from outbox_relay.connectors.sinks.webhook.redaction import (
    has_credentials,
    redact_webhook_url,
    remember_header_secrets,
    remember_url_secrets,
)
from outbox_relay.durations import Duration
from outbox_relay.registry import ConnectorConfig
from outbox_relay.secrets import parse_url_setting

#: What a static header value may hold: visible ASCII, space and tab (httpx encodes str values as
#: ASCII, and refuses anything else on every request).
_NOT_ASCII_VALUE = re.compile(r"[^\t\x20-\x7e]")
# Headers the sink sets itself, per request.
_OWNED_HEADERS = {
    "content-type": "it is the event's content type (application/json in batch mode)",
    "content-length": "httpx sets it",
    "transfer-encoding": "httpx sets it",
    "host": "it comes from url",
    "connection": "httpx manages connections",
    "idempotency-key": "it is the event id",
}


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
        remember_header_secrets(value)
        url = info.data.get("url")
        for name in value:
            if name.lower() == "authorization" and url is not None and has_credentials(url):
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
            if not HEADER_NAME.match(name):
                raise ValueError(f"header name {name!r} is not a valid HTTP header name")
            if name.lower() in _OWNED_HEADERS:
                raise ValueError(f"header {name} cannot be set here: {_OWNED_HEADERS[name.lower()]}")
            if BAD_VALUE.search(header):
                raise ValueError(f"header {name} has a line break or NUL in its value")
            if _NOT_ASCII_VALUE.search(header):
                # (The value is not echoed: it may be a credential.)
                raise ValueError(
                    f"header {name} has a character HTTP headers cannot carry in its value: write"
                    " visible ASCII only (percent-encode or base64 other text)"
                )
        return value
