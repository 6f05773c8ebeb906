"""Keeps passwords out of logs, errors, stored rows and `check` output.

Two layers: `redact_url` rewrites a DSN or URL for display, and `SecretScrubber` remembers every
secret found in the loaded config, in every form a client library or a receiver may echo it, so
that any text (an exception message from a client library, a response body, a log field) can be
scrubbed. The forms are systematic: each plain form (the secret as written and percent-decoded,
base64 and base64url of it and of `user:password`, the credential of an `Authorization` header)
in each encoding a receiver may echo it in (as is, percent-encoded with `quote` and with
`quote_plus`, inside a JSON string with and without `\\/` for `/`): a fixed set per secret.

Every scan here is linear in the length of the text: no pattern can backtrack over what it
already read, so a value of megabytes costs milliseconds, not minutes.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from psycopg.conninfo import conninfo_to_dict

#: What a secret is replaced with wherever text is shown.
MASK = "***"
# Settings whose value is a secret by their name: librdkafka's sasl.password, ssl.key.password,
# ssl.key.pem, sasl.oauthbearer.config, sasl.oauthbearer.extensions (key=value pairs that may
# carry credentials) and any `password`, `secret` or `token` key of ours.
_SECRET_KEY = re.compile(
    r"password|secret|token|(^|\.)ssl\.key\.pem$|^sasl\.oauthbearer\.(config|extensions)$", re.IGNORECASE
)
# `://user:password@` of a URL. The password run and the `@` after it are matched whatever
# follows (`@?`), so a run without `@` is read once and given back unchanged (see _masked_url):
# every character is read a bounded number of times, even in megabytes of `x://u:x://u:...`.
_URL_CREDENTIALS = re.compile(r"://(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)(?P<at>@?)")
# `password=...` of a keyword DSN; the quoted form is the unrolled loop `'[^'\\]*(?:\\.[^'\\]*)*'`,
# which has one way to match any text.
_KV_PASSWORD = re.compile(
    r"(?P<key>\b(?ai:(?:ssl)?password)\s*=\s*)(?P<pw>'[^'\\]*(?:\\.[^'\\]*)*'|\S+)", re.IGNORECASE
)
_KV_REST = re.compile(r"\b(?:ssl)?password\s*=\s*(.*)", re.IGNORECASE | re.DOTALL)
#: libpq's keywords whose value is a secret: the login's password and the client key's.
_SECRET_KEYWORDS = ("password", "sslpassword")
# Secrets shorter than this are not remembered: masking every "ab" would make text unreadable.
_SHORTEST = 3


def _masked_url(match: re.Match[str]) -> str:
    return f"://{match['user']}:{MASK}@" if match["at"] else match[0]


def _may_hold_keyword_password(text: str) -> bool:
    return "password" in text.lower()


def redact_url(text: str) -> str:
    """Replace passwords in URL-style (`scheme://user:pw@host`) and key=value DSNs with ***."""
    if "://" in text:
        text = _URL_CREDENTIALS.sub(_masked_url, text)
    if _may_hold_keyword_password(text):
        text = _KV_PASSWORD.sub(lambda m: f"{m['key']}{MASK}", text)
    return text


def credentials_in(text: str) -> list[tuple[str, str]]:
    """The (user, password) pairs written into URLs in `text`, as written (percent-encoded)."""
    if "://" not in text:
        return []
    return [(m["user"], m["pw"]) for m in _URL_CREDENTIALS.finditer(text) if m["at"]]


def passwords_in(text: str) -> list[str]:
    """Every password written into a DSN or URL, raw and percent-decoded. A keyword DSN is read
    as libpq reads it (`password='a b'` is one password with a space); one libpq cannot read
    (`password=a b`, an unmatched quote) gives up everything after `password=`, whole and word by
    word: libpq's error message quotes the words it stumbled on."""
    found: list[str] = [password for _, password in credentials_in(text)]
    for match in _KV_PASSWORD.finditer(text):
        found.append(match["pw"].strip("'"))
    if "password" in text.lower() and "://" not in text:
        try:
            params = conninfo_to_dict(text)
            found.extend(str(params[key]) for key in _SECRET_KEYWORDS if params.get(key))
        except Exception:  # not a DSN libpq reads: everything after password= may be secret
            for rest in _KV_REST.findall(text):
                found.append(rest)
                found.extend(word for token in rest.split() for word in (token, *token.split("'")))
    try:
        parts = urlsplit(text)
        if parts.password:
            found.append(parts.password)
        query = parse_qs(parts.query)
        found.extend(value for key in _SECRET_KEYWORDS for value in query.get(key, []))
    except ValueError:
        pass
    return [p for p in {*found, *(unquote(p) for p in found)} if p]


def _b64(text: str) -> str:
    """Standard base64 of the UTF-8 bytes, without the padding (so an unpadded copy matches too)."""
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii").rstrip("=")


def _b64url(text: str) -> str:
    """base64url (`-` and `_` for `+` and `/`) of the UTF-8 bytes, without the padding."""
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii").rstrip("=")


# How `quote(safe="")`, `quote()` (keeps `/`) and `quote_plus()` (space as `+`) write each byte
# (as a latin-1 character) they encode: `str.translate` applies them in C, where urllib's `quote`
# runs Python code per byte, so a secret of megabytes is encoded in a fraction of a second.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_QUOTE = {b: f"%{b:02X}" for b in range(256) if b not in _UNRESERVED}
_QUOTE_PATH = {b: text for b, text in _QUOTE.items() if b != ord("/")}
_QUOTE_PLUS = {**_QUOTE, ord(" "): "+"}
_ONLY_UNRESERVED = re.compile(r"[A-Za-z0-9_.~\-]*")


def _percent(text: str, table: dict[int, str]) -> str:
    """`text` percent-encoded as urllib's `quote` (`_QUOTE`, `_QUOTE_PATH`) or `quote_plus`
    (`_QUOTE_PLUS`) does it."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1").translate(table)


_URLSAFE = str.maketrans("+/", "-_")
_LOWER_HEX = re.compile(r"%[0-9A-F]{2}")
_HTML_SPECIAL = re.compile(r"[&<>]")
_GO_JSON = str.maketrans({"&": "\\u0026", "<": "\\u003c", ">": "\\u003e"})


def _encoded(plain: str) -> set[str]:
    """`plain` in every encoding a receiver or a client library may echo it in: as is,
    percent-encoded (`quote` with nothing safe, `quote` keeping `/`, `quote_plus`), and as the
    inside of a JSON string (non-ASCII escaped or not, `/` as is or as `\\/`, as PHP writes it).
    Encodings that cannot differ from one already made are skipped (cheap checks first)."""
    forms = {plain}
    if not _ONLY_UNRESERVED.fullmatch(plain):
        forms.add(_percent(plain, _QUOTE))
        if "/" in plain:
            forms.add(_percent(plain, _QUOTE_PATH))
        if " " in plain:
            forms.add(_percent(plain, _QUOTE_PLUS))
    # Lower-case hex digits: percent-encoding is case-insensitive, and some encoders write them so.
    forms |= {_LOWER_HEX.sub(lambda m: m[0].lower(), f) for f in list(forms) if "%" in f}
    dumped = {json.dumps(plain)[1:-1]}
    if not plain.isascii():
        dumped.add(json.dumps(plain, ensure_ascii=False)[1:-1])
    for text in list(dumped):
        if "/" in text:
            dumped.add(text.replace("/", "\\/"))
        if _HTML_SPECIAL.search(text):  # as Go's encoding/json writes it: \u0026 \u003c \u003e
            dumped.add(text.translate(_GO_JSON))
    forms |= dumped
    if _HTML_SPECIAL.search(plain) or "'" in plain or '"' in plain:  # as an HTML page shows it
        forms |= {
            html.escape(plain),
            html.escape(plain, quote=False),
            html.escape(plain).replace("&#x27;", "&#39;"),
        }
    data = plain.encode("utf-8", "surrogatepass")  # as hex, as some libraries dump bytes
    forms |= {data.hex(), data.hex().upper()}
    return forms


def _plain_and_encoded(plain: set[str]) -> set[str]:
    """Each plain form, its base64 (also of its percent-encoded form), base64url of each plain
    form and of each base64 form, each in every encoding (`_encoded`): a few dozen forms, fixed
    per secret."""
    encoded = {b64 for p in plain for b64 in (_b64(p), _b64(_percent(p, _QUOTE)))}
    # base64url: of each plain form's bytes (base64's `+/` as `-_`), and of a base64 form too.
    bases = plain | encoded | {b.translate(_URLSAFE) for b in encoded} | {_b64url(b) for b in encoded}
    forms: set[str] = set()
    for base in bases:
        if len(base) >= _SHORTEST:
            forms |= _encoded(base)
    return forms


def secret_forms(secret: str) -> set[str]:
    """The forms a secret is seen in: as written and percent-decoded, base64 and base64url of
    each, each of those in every encoding a receiver may echo (`_encoded`)."""
    return _plain_and_encoded({s for s in (secret, unquote(secret)) if len(s) >= _SHORTEST})


def credential_forms(user: str, password: str) -> set[str]:
    """The forms of a user and password pair: the password's (`secret_forms`), and
    `user:password` with its base64 (as HTTP Basic auth and SASL/PLAIN-style clients send it),
    in every encoding."""
    pairs = {f"{u}:{p}" for u in {user, unquote(user)} for p in {password, unquote(password)}}
    return secret_forms(password) | _plain_and_encoded(pairs)


class SecretScrubber:
    """Process-wide memory of secrets to remove from any text shown to a person."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        # What `scrub` replaces, longest first (so a password containing another one is masked
        # whole); kept sorted here because `scrub` runs for every field of every log line.
        self._ordered: tuple[str, ...] = ()

    def remember_from(self, text: str) -> None:
        """Every password in the DSNs and URLs of `text`, with every form of it."""
        forms: set[str] = set()
        for password in passwords_in(text):
            forms |= secret_forms(password)
        for user, password in credentials_in(text):
            forms |= credential_forms(user, password)
        self._add(forms)

    def remember(self, secret: str) -> None:
        """A value known to be secret (a setting named like a password), in every form."""
        self._add(secret_forms(secret))

    def remember_credentials(self, user: str, password: str) -> None:
        """A user and password pair (Basic auth): the password and `user:password` in every form."""
        self._add(credential_forms(user, password))

    def remember_authorization(self, value: str) -> None:
        """An `Authorization`-style header value: the whole value, the credential after its
        scheme (`Bearer <token>`), and for `Basic <base64>` the password inside."""
        self.remember(value.strip())
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if not credential:
            return
        self.remember(credential)
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credential, validate=True).decode()
            except (binascii.Error, ValueError, UnicodeDecodeError):
                return
            user, _, password = decoded.partition(":")
            self.remember_credentials(user, password)

    def _add(self, secrets: set[str]) -> None:
        new = {s for s in secrets if len(s) >= _SHORTEST} - self._secrets
        if new:
            self._secrets |= new
            self._ordered = tuple(sorted(self._secrets, key=len, reverse=True))

    @property
    def longest(self) -> int:
        return len(self._ordered[0]) if self._ordered else 0

    def scrub(self, text: str) -> str:
        """`text` with every password pattern and every remembered secret masked (linear in the
        length of `text` for each remembered secret)."""
        text = redact_url(text)
        for secret in self._ordered:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def scrub_shortened(self, text: str, limit: int) -> str:
        """`scrub(text)` cut to about `limit` characters, with a note of the original length when
        cut. Only the kept part (and a margin) is scrubbed, so a value of megabytes costs as
        little as a short one, and no secret is cut in two: a secret that starts in the kept part
        is masked whole, and what may be the start of one in the margin is dropped."""
        if len(text) <= limit:
            return self.scrub(text)
        margin = max(self.longest, 256)
        shown = self.scrub(text[: limit + margin])
        # The last `margin` characters may hold the beginning of a secret cut off by the window.
        shown = shown[: min(limit, max(len(shown) - margin, 0))]
        return f"{shown}... [{len(text)} characters, cut]"


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
