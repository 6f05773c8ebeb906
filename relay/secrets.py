"""Keeps passwords out of logs, errors and `check` output.

Two layers: `redact_url` rewrites a DSN or URL for display, and `SecretScrubber` remembers every
password found in the loaded config so that any text (an exception message from a client library,
a log field) can be scrubbed even when the library echoed the password in a form we did not expect.
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, unquote, urlsplit

from psycopg.conninfo import conninfo_to_dict

#: What a secret is replaced with wherever text is shown.
MASK = "***"
# Settings whose value is a secret by their name: librdkafka's sasl.password, ssl.key.password,
# ssl.key.pem, sasl.oauthbearer.config, and any `password`, `secret` or `token` key of ours.
_SECRET_KEY = re.compile(
    r"password|secret|token|(^|\.)ssl\.key\.pem$|^sasl\.oauthbearer\.config$", re.IGNORECASE
)
# (A scheme starts where a run of scheme characters starts: tried from inside the run too, a long
# run without `://` took quadratic time.)
_URL_PASSWORD = re.compile(
    r"(?<![a-zA-Z0-9+.-])(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@"
)
_KV_PASSWORD = re.compile(r"(?P<key>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_KV_REST = re.compile(r"\bpassword\s*=\s*(.*)", re.IGNORECASE | re.DOTALL)


def redact_url(text: str) -> str:
    """Replace passwords in URL-style (`scheme://user:pw@host`) and key=value DSNs with ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _KV_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", text)


def passwords_in(text: str) -> list[str]:
    """Every password written into a DSN or URL, raw and percent-decoded. A keyword DSN is read
    as libpq reads it (`password='a b'` is one password with a space); one libpq cannot read
    (`password=a b`, an unmatched quote) gives up everything after `password=`, whole and word by
    word: libpq's error message quotes the words it stumbled on."""
    found: list[str] = []
    for match in _URL_PASSWORD.finditer(text):
        found.append(match["pw"])
    for match in _KV_PASSWORD.finditer(text):
        found.append(match["pw"].strip("'"))
    if "password" in text.lower() and "://" not in text:
        try:
            value = conninfo_to_dict(text).get("password")
            if value:
                found.append(str(value))
        except Exception:  # not a DSN libpq reads: everything after password= may be secret
            for rest in _KV_REST.findall(text):
                found.append(rest)
                found.extend(word for token in rest.split() for word in (token, *token.split("'")))
    try:
        parts = urlsplit(text)
        if parts.password:
            found.append(parts.password)
    except ValueError:
        pass
    return [p for p in {*found, *(unquote(p) for p in found)} if p]


class SecretScrubber:
    """Process-wide memory of secrets to remove from any text shown to a person."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        # What `scrub` replaces, longest first (so a password containing another one is masked
        # whole); kept sorted here because `scrub` runs for every field of every log line.
        self._ordered: tuple[str, ...] = ()

    def remember_from(self, text: str) -> None:
        self._add(passwords_in(text))

    def remember(self, secret: str) -> None:
        """A value known to be secret (a setting named like a password)."""
        self._add([secret])

    def _add(self, secrets: list[str]) -> None:
        new = {s for s in secrets if len(s) >= 3} - self._secrets
        if new:
            self._secrets |= new
            self._ordered = tuple(sorted(self._secrets, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        text = redact_url(text)
        for secret in self._ordered:
            text = text.replace(secret, MASK)
        return text


scrubber = SecretScrubber()


def is_secret_key(name: str) -> bool:
    """True for a setting whose value must never be shown (by its name alone)."""
    return bool(_SECRET_KEY.search(name))


def parse_url_setting(value: str, schemes: tuple[str, ...], shown: str | None = None) -> SplitResult:
    """Check a broker URL from the config without ever echoing its password: remember its
    secrets for scrubbing, then parse it. Raises ValueError with the URL redacted (`shown`)."""
    scrubber.remember_from(value)
    shown = shown or redact_url(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ValueError(f"url {shown!r} is not a valid URL ({scrubber.scrub(str(exc))})") from None
    if parts.scheme not in schemes:
        names = [f"{scheme}://" for scheme in schemes]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"url {shown!r} must start with {listed}")
    return parts
