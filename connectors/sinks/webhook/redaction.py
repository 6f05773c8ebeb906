"""What of the webhook's settings is a credential, and how it is kept out of every text shown:
static header values (all but well-known plain headers), the URL's user and password (and the
Basic Authorization header httpx makes of them), secret-looking query parameters."""

from __future__ import annotations

import base64
import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from outbox_relay.secrets import is_secret_key, redact_url, scrubber

# Static headers whose value is a credential, by name (besides password/secret/token).
_SECRET_HEADER = re.compile(r"authorization|cookie|api[-_]?key|auth|signature|credential", re.IGNORECASE)

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


def remember_header_secrets(headers: dict[str, str]) -> None:
    """`remember_header_secret` for every static header whose value is a credential."""
    for name, value in headers.items():
        if is_secret_header(name):
            remember_header_secret(value)


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


def has_credentials(url: str) -> bool:
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
