"""Sink `nats`: publishes every event to a NATS JetStream stream (nats-py) and waits for its PubAck.

An acknowledgement is a JetStream PubAck for that message: the stream stored it (on disk with the
default file storage, on a quorum of replicas for a replicated stream). A PubAck that does not
arrive within `ack_timeout`, and a connection lost before it, are transient failures; the
pipeline retries them, so an event without a PubAck is never marked published.

Every message carries `Nats-Msg-Id: <event_id>`. JetStream drops a message whose id it already
stored within the stream's `duplicate_window` (default 2 minutes) and answers with a PubAck marked
`duplicate`: a re-send after a timeout or a relay restart within that window does not reach
consumers twice. Older repeats still can (at-least-once); consumers dedupe by `event_id`.

PubAcks are pipelined: one call publishes all of its events on the connection with a reply
subject each, then waits once for all the PubAcks. (nats-py's `publish_async` does the same, but
in 2.16 a JetStream error reply raises inside its callback and leaves the future unresolved, so a
refused message would look like a timeout; the sink therefore reads the replies itself.)

Reconnecting is nats-py's job (it retries forever, `reconnect_wait` apart); while it reconnects,
publish reports transient failures at once instead of buffering blindly.

`nats` is imported inside methods only, so that a config naming this sink validates (and `check`
can say which extra to install) on an installation without the `nats` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import Field, ValidationInfo, field_validator, model_validator

from outbox_relay.durations import Duration
from outbox_relay.events import LEASE_ENDED, Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink
from outbox_relay.logs import get_logger
from outbox_relay.registry import ConnectorConfig, SinkPlugin
from outbox_relay.secrets import redact_url, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, Template, check_template

_SCHEMES = ("nats", "tls", "ws", "wss")
# NATS stream names: no whitespace, no '.', '*', '>' and no path separators (they name files).
_STREAM_NAME = re.compile(r"^[^\s.*>/\\]{1,255}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # what nats-py accepts as a header key
_FIELD = re.compile(r"\{[^{}]*\}")
_CLOSE_TIMEOUT_S = 5.0
# Publishing writes into nats-py's buffer without a round trip; a break every this many messages
# lets PubAcks be read (and /healthz answered) while a large call is still being written.
_YIELD_EVERY = 256

# JetStream error codes (`err_code` of an error reply) that say the stream or server as a whole
# cannot take messages right now: retrying later may work, and they are not the event's fault.
_TRANSIENT_ERR_CODES = frozenset(
    {
        10008,  # JetStream temporarily unavailable
        10023,  # insufficient resources
        10077,  # storing the message failed (stream limits with discard: new, disk full)
    }
)
_STREAM_HINTS = {
    10065: " (another stream already takes some of these subjects: set subjects: to ones of this stream's "
    "own, or point stream: at that stream)",
    10058: " (a stream with this name exists with other settings)",
}
_HINTS = {
    10054: "the message is larger than the stream's max_msg_size",
    10060: "the subject belongs to another stream than the configured one",
}


def _split_servers(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _with_scheme(server: str) -> str:
    return server if "://" in server else f"nats://{server}"


def redact_server(url: str) -> str:
    """A server URL for display: a password, or a token given as the user part, is masked."""
    url = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.username and parts.password is None:  # nats://TOKEN@host
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return url


def default_subjects(template: str) -> list[str]:
    """The stream subjects that cover every subject the template renders: each token with a field
    becomes `*`, and a last token with a field becomes `>` (a field value may contain dots)."""
    tokens = ["*" if _FIELD.search(token) else token for token in template.split(".")]
    if tokens[-1] == "*":
        tokens[-1] = ">"
    return [".".join(tokens)]


def _literal_prefix(template: str) -> str:
    """The text of a subject template before its first field (all of it without fields)."""
    first = next(iter(string.Formatter().parse(template)), None)
    return "" if first is None else first[0]


def _may_cover(stream_subject: str, template: str) -> bool:
    """Whether a stream subject (with NATS wildcards `*` and `>`) matches the subjects the template
    renders, as far as its literal prefix tells: the whole subject when it has no field, else the
    complete tokens before the first field (what follows depends on each event)."""
    pattern = stream_subject.split(".")
    prefix = _literal_prefix(template)
    has_field = prefix != template.replace("{{", "{").replace("}}", "}")
    tokens = prefix.split(".")
    if has_field:
        tokens = tokens[:-1]  # (the token the field is in is not known)
    for index, token in enumerate(tokens):
        if index >= len(pattern):
            return False
        if pattern[index] == ">":
            return True
        if pattern[index] not in ("*", token):
            return False
    if has_field:
        return len(pattern) > len(tokens)
    return len(pattern) == len(tokens)


def _words_problem(subject: str, what: str, shown: str | None = None) -> str | None:
    """Why a subject (or a stream subject, or a template's words) is not one NATS takes, or None:
    whitespace, an empty word, or a `$` start (`$JS.`, `$SYS.`: the server's own subjects)."""
    what = f"{what} {shown if shown is not None else repr(subject)}"
    if any(c.isspace() for c in subject):
        return f"{what} contains whitespace"
    if any(word == "" for word in subject.split(".")):
        return f"{what} has an empty word ('..', or a '.' at its start or end)"
    if subject.startswith("$"):
        return f"{what} starts with '$': those subjects belong to the server ($JS, $SYS)"
    return None


def subjects_collide(first: str, second: str) -> bool:
    """Whether some subject matches both stream subjects (NATS wildcards `*` one word, `>` the rest):
    JetStream refuses a stream whose subjects overlap."""
    a, b = first.split("."), second.split(".")
    for x, y in zip(a, b, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(a) == len(b)


def stream_subjects_problems(config: NatsSinkConfig) -> list[tuple[str, str]]:
    """What is wrong with the subjects of the stream the relay would create (declare: true), as
    (key, reason) pairs: a subject starting with a wildcard (`>`, `*.>`) captures every subject
    on the server, `$JS.API` included, and breaks JetStream for every client."""
    if not config.declare:
        return []
    given = config.subjects is not None
    key = "subjects" if given else "subject"
    for stream_subject in config.stream_subjects():
        if stream_subject.split(".")[0] in ("*", ">"):
            source = "" if given else f" (derived from subject template {config.subject!r})"
            return [
                (
                    key,
                    f"the stream would be created on {stream_subject!r}{source}, which starts with a "
                    "wildcard and would capture every subject on the server, $JS.API included; give "
                    "the subject a literal first word (e.g. 'outbox.{aggregate_type}') or list "
                    "subjects: explicitly",
                )
            ]
    return []


def subject_problem(subject: str) -> str | None:
    """Why a rendered subject cannot be published to, or None."""
    if not subject:
        return "the subject is empty"
    if any(c.isspace() for c in subject):
        return f"subject {subject!r} contains whitespace"
    tokens = subject.split(".")
    if any(token == "" for token in tokens):
        return f"subject {subject!r} has an empty token (an empty field value, or '..')"
    if any(token in ("*", ">") for token in tokens):
        return f"subject {subject!r} contains a wildcard token"
    return None


class NatsSinkConfig(ConnectorConfig):
    type: Literal["nats"]
    servers: list[str] = Field(
        min_length=1,
        description="NATS server URLs (a list or a comma-separated string): "
        "nats://[user:password@]host:4222, tls://..., or host:port. Credentials are never shown.",
    )
    subject: str = Field(
        default="outbox.{aggregate_type}.{event_type}",
        min_length=1,
        description=f"Subject template; fields: {', '.join(TEMPLATE_FIELDS)}.",
    )
    stream: str = Field(default="OUTBOX", description="JetStream stream the subjects belong to.")
    declare: bool = Field(
        default=True,
        description="Create the stream (file storage) when it is missing; false only checks that it exists.",
    )
    subjects: list[str] | None = Field(
        default=None,
        description="Subjects the stream is created with (declare: true); default derived from the subject "
        "template, e.g. outbox.*.> for outbox.{aggregate_type}.{event_type}.",
    )
    duplicate_window: Duration = Field(
        default=120.0,
        gt=0,
        description="Deduplication window of a stream the relay creates: a repeat of a Nats-Msg-Id within "
        "it is dropped by JetStream. An existing stream keeps its own.",
    )
    ack_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="How long a call waits for PubAcks before its unacknowledged events count as failed.",
    )
    connect_timeout: Duration = Field(default=5.0, gt=0, description="Bound on connecting to a server.")
    reconnect_wait: Duration = Field(
        default=1.0,
        ge=0.01,
        description="Pause between reconnect attempts after a connection was lost (at least 10ms: a server"
        " that is down must not make the relay spin).",
    )

    @field_validator("servers", mode="before")
    @classmethod
    def _server_list(cls, value: object) -> object:
        return _split_servers(value)

    @field_validator("servers")
    @classmethod
    def _valid_servers(cls, value: list[str]) -> list[str]:
        checked: list[str] = []
        for server in value:
            scrubber.remember_from(server)
            url = _with_scheme(server.strip())
            shown = redact_server(url)
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises ValueError for a port that is not a number
            except ValueError as exc:
                raise ValueError(
                    f"server {shown!r} is not a valid URL ({scrubber.scrub(str(exc))})"
                ) from None
            if parts.username and parts.password is None:
                scrubber.remember(parts.username)  # a token
            if parts.scheme not in _SCHEMES:
                raise ValueError(f"server {shown!r} must start with one of {', '.join(_SCHEMES)}://")
            if not parts.hostname:
                raise ValueError(f"server {shown!r} has no host")
            checked.append(url)
        return checked

    @field_validator("subject")
    @classmethod
    def _valid_subject(cls, value: str) -> str:
        for literal in check_template(value, "subject"):
            if any(c.isspace() for c in literal) or "*" in literal or ">" in literal:
                raise ValueError(
                    f"subject template {value!r} has whitespace or a wildcard ('*', '>'); "
                    "messages are published to concrete subjects"
                )
        # The words of the template as written (a field's value may hold dots, not its braces).
        problem = _words_problem(_FIELD.sub("x", value), "subject template", repr(value))
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("stream")
    @classmethod
    def _valid_stream(cls, value: str) -> str:
        if not _STREAM_NAME.match(value):
            raise ValueError(
                f"stream {value!r} is not a valid JetStream stream name "
                "(no whitespace, '.', '*', '>', '/' or '\\')"
            )
        return value

    @field_validator("subjects")
    @classmethod
    def _subjects_cover_the_subject(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        seen: dict[str, int] = {}
        for index, stream_subject in enumerate(value or []):
            problem = _words_problem(stream_subject, "stream subject")
            if problem is not None:
                raise ValueError(f"subjects[{index}]: {problem}")
            if stream_subject in seen:
                raise ValueError(
                    f"{stream_subject!r} is listed twice (subjects[{seen[stream_subject]}] and "
                    f"subjects[{index}]); JetStream refuses duplicate subjects"
                )
            for other, at in seen.items():
                if subjects_collide(other, stream_subject):
                    raise ValueError(
                        f"subjects[{at}] {other!r} and subjects[{index}] {stream_subject!r} overlap"
                        " (some subject matches both); JetStream refuses overlapping subjects: keep"
                        " the wider one"
                    )
            seen[stream_subject] = index
        subject, declare = info.data.get("subject"), info.data.get("declare")
        if not value or subject is None or not declare:
            return value  # (a stream the relay does not create is checked by check --connect)
        if not any(_may_cover(stream_subject, subject) for stream_subject in value):
            prefix = _literal_prefix(subject)
            raise ValueError(
                f"no subject in it covers {prefix!r} (where subject template {subject!r} publishes):"
                " JetStream would refuse every event with 'no stream matches subject'; add one such"
                f" as {default_subjects(subject)[0]!r}"
            )
        return value

    @model_validator(mode="after")
    def _stream_subjects(self) -> NatsSinkConfig:
        if self.subjects is not None and not self.subjects:
            raise ValueError("subjects must name at least one subject (or be left out)")
        return self

    def stream_subjects(self) -> list[str]:
        return self.subjects if self.subjects is not None else default_subjects(self.subject)


# --- the sink ------------------------------------------------------------------------------------


class _Unsettled:
    """Marks a slot still waiting for its PubAck."""


_UNSETTLED = _Unsettled()


@dataclass(slots=True)
class _Call:
    """The events of one publish call still waiting for their PubAck."""

    results: list[PublishResult | _Unsettled]
    done: asyncio.Future[None]
    remaining: int = 0
    #: Every event of the call was handed to the client. Until then PubAcks may catch up with
    #: the events sent so far (the loop yields, a big message waits for a flush), and that
    #: must not end the wait for the events not sent yet.
    sealed: bool = False

    def settle(self, index: int, result: PublishResult) -> None:
        self.results[index] = result
        self.remaining -= 1
        if self.sealed and self.remaining == 0 and not self.done.done():
            self.done.set_result(None)


@dataclass(slots=True)
class _Link:
    """One connection with the reply subscription its PubAcks come back on."""

    client: Any
    reply_prefix: str
    waiting: dict[str, tuple[_Call, int, str]] = field(default_factory=dict)
    tokens: itertools.count[int] = field(default_factory=itertools.count)
    #: Connection errors since the last successful (re)connect: only the first one is a warning.
    errors: int = 0

    def fail_waiting(self, reason: str, *, setup: bool = False, subject: str | None = None) -> None:
        """Settle every event still waiting for a PubAck (on `subject` only, when given) as a
        transient failure; `setup`: the server refused the relay's permissions for it."""
        failure = Failure(reason, transient=True, setup=setup)
        if subject is None:
            waiting, self.waiting = self.waiting, {}
        else:
            waiting = {token: entry for token, entry in self.waiting.items() if entry[2] == subject}
            for token in waiting:
                del self.waiting[token]
        for call, index, _subject in waiting.values():
            call.settle(index, failure)


# The server refuses the relay's user a publish (or the subscription its PubAcks come back on):
# `-ERR 'Permissions Violation for Publish to "orders.created"'`. It sends nothing else about the
# message, so without this the event would wait for ack_timeout and pass for an outage.
_PERMISSIONS_VIOLATION = re.compile(r"permissions violation for (\w+) to \"([^\"]*)\"", re.IGNORECASE)


def permissions_violation(exc: BaseException | None) -> tuple[str, str] | None:
    """(operation, subject) of a NATS permissions violation, or None for another error."""
    if exc is None:
        return None
    match = _PERMISSIONS_VIOLATION.search(str(exc))
    return (match[1].lower(), match[2]) if match else None


def _reply_result(data: bytes, headers: dict[str, str] | None, subject: str, stream: str) -> PublishResult:
    """The outcome a JetStream reply to a publish stands for."""
    status = (headers or {}).get("Status", "")
    if status == "503":
        # No stream takes the subject: a stream missing or not listing it (the setup), or
        # JetStream not serving yet after a restart. Either way the event waits, said as a setup
        # problem; it is not the event's fault, and dead-lettering would empty the outbox.
        return Failure(
            f"no JetStream stream matches subject {subject!r} (no responders); "
            f"the stream {stream!r} must list it in its subjects",
            transient=True,
            setup=True,
        )
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        return Failure(f"unexpected reply to a publish on {subject!r}: {data[:200]!r}")
    if not isinstance(reply, dict):
        return Failure(f"unexpected reply to a publish on {subject!r}: {data[:200]!r}")
    error = reply.get("error")
    if isinstance(error, dict):
        code, err_code = error.get("code"), error.get("err_code")
        description = str(error.get("description", "")).strip()
        hint = _HINTS.get(err_code) if isinstance(err_code, int) else None
        reason = (
            f"JetStream refused the message on {subject!r}: {description} (code {code}, err_code {err_code})"
        )
        if hint:
            reason += f": {hint}"
        transient = err_code in _TRANSIENT_ERR_CODES or code == 503
        return Failure(reason, permanent=code == 400 and not transient, transient=transient)
    if "seq" not in reply:
        return Failure(f"unexpected reply to a publish on {subject!r}: {data[:200]!r}")
    return None


def _explain(exc: BaseException) -> str:
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text and text != type(exc).__name__ else type(exc).__name__
    return scrubber.scrub(message)


class NatsSink(Sink):
    kind = "nats"

    def __init__(self, config: NatsSinkConfig) -> None:
        self.config = config
        self._subject = Template(config.subject, "subject")
        for server in config.servers:
            scrubber.remember_from(server)
        self._display_servers = [redact_server(server) for server in config.servers]
        self._link: _Link | None = None
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
        client = link.client
        loop = asyncio.get_running_loop()
        call = _Call([_UNSETTLED] * len(events), loop.create_future())
        if not client.is_connected:
            failure = Failure("not published: not connected to NATS (reconnecting)", transient=True)
            return [failure] * len(events)
        config = self.config
        render, stream = self._subject.render, config.stream
        tokens: list[str] = []
        from nats import errors as nats_errors

        for index, event in enumerate(events):
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if not self.may_send():
                call.results[index] = LEASE_ENDED
                continue
            subject = render(event)
            problem = subject_problem(subject)
            if problem is not None:
                call.results[index] = Failure(f"not published: {problem}", permanent=True)
                continue
            headers = event.standard_headers()
            bad = next((name for name in headers if not _HEADER_NAME.match(name)), None)
            if bad is not None:
                call.results[index] = Failure(
                    f"not published: header name {bad!r} cannot be carried by NATS "
                    "(letters, digits and !#$%&'*+-.^_`|~ only)",
                    permanent=True,
                )
                continue
            headers["Nats-Msg-Id"] = event.event_id
            headers["Nats-Expected-Stream"] = stream
            headers["Content-Type"] = event.content_type
            token = str(next(link.tokens))
            try:
                await client.publish(subject, event.payload, reply=link.reply_prefix + token, headers=headers)
            except (
                nats_errors.MaxPayloadError,
                nats_errors.BadSubjectError,
                nats_errors.BadHeaderError,
            ) as exc:
                call.results[index] = Failure(
                    f"not published on {subject!r}: {_explain(exc)}", permanent=True
                )
                continue
            except Exception as exc:
                call.results[index] = Failure(
                    f"not published on {subject!r}: {_explain(exc)}", transient=True
                )
                continue
            link.waiting[token] = (call, index, subject)
            call.remaining += 1
            tokens.append(token)
        call.sealed = True
        if call.remaining:
            await asyncio.wait((call.done,), timeout=config.ack_timeout)
        if call.remaining:
            connected = "" if client.is_connected else " (connection to NATS lost)"
            failure = Failure(
                f"no PubAck from JetStream within {config.ack_timeout:g}s (ack_timeout){connected}",
                transient=True,
            )
            for token in tokens:
                waiting = link.waiting.pop(token, None)
                if waiting is not None:
                    call.settle(waiting[1], failure)
        # Every slot is settled by now; an unsettled one is never reported as acknowledged.
        unsettled = Failure("no PubAck from JetStream", transient=True)
        return [unsettled if isinstance(r, _Unsettled) else r for r in call.results]

    async def check(self) -> None:
        """Connect, check (or create, with `declare: true`) the stream, and disconnect."""
        link = await self._connect()
        await self._close_link(link)

    async def close(self) -> None:
        """Every publish call already waited for its PubAcks; close flushes and disconnects."""
        link, self._link = self._link, None
        if link is not None:
            await self._close_link(link)

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

    # --- connection ---------------------------------------------------------------------------

    async def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and not link.client.is_closed:
            return link
        async with self._connect_lock:
            link = self._link
            if link is not None and not link.client.is_closed:
                return link
            self._link = await self._connect()
            self._log.info("connected to NATS")
            return self._link

    async def _connect(self) -> _Link:
        from nats.aio.client import Client
        from nats.errors import NoRespondersError
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError, ServiceUnavailableError

        config = self.config
        log = self._log
        link = _Link(Client(), f"_INBOX.relay.{uuid.uuid4().hex}.")
        client = link.client

        async def on_error(exc: Exception) -> None:
            violation = permissions_violation(exc)
            if violation is not None:
                operation, subject = violation
                log.error("NATS refused the relay's user", error=_explain(exc))
                link.fail_waiting(
                    f"NATS refused the relay's user: {_explain(exc)} (grant it {operation} permission "
                    f"on {subject!r})",
                    setup=True,
                    subject=subject if operation == "publish" else None,
                )
                return
            # nats-py reports every failed reconnect attempt; one warning per outage is enough.
            link.errors += 1
            if link.errors == 1:
                log.warning("NATS connection error", error=_explain(exc))
            else:
                log.debug("NATS connection error", error=_explain(exc), errors=link.errors)

        async def on_disconnected() -> None:
            # Replies to what was published on the lost connection will not come: fail those
            # events now rather than after ack_timeout (a re-send is deduplicated by Nats-Msg-Id).
            violation = permissions_violation(client.last_error)
            if violation is not None:  # (nats-py closes the connection on some versions' wording)
                link.fail_waiting(f"NATS refused the relay's user: {_explain(client.last_error)}", setup=True)
            link.fail_waiting("connection to NATS lost before the PubAck")
            if not client.is_closed:
                log.warning("disconnected from NATS, reconnecting")

        async def on_reconnected() -> None:
            log.info("reconnected to NATS", failed_attempts=link.errors)
            link.errors = 0

        where = ",".join(self._display_servers)
        try:
            # nats-py retries the initial connect too (max_reconnect_attempts=-1); the bound is ours.
            await asyncio.wait_for(
                client.connect(
                    servers=config.servers,
                    name="outbox-relay",
                    connect_timeout=config.connect_timeout,
                    reconnect_time_wait=config.reconnect_wait,
                    max_reconnect_attempts=-1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                ),
                config.connect_timeout,
            )
        except TimeoutError:
            await self._abandon(client)
            raise ConnectorError(
                f"NATS at {where}: no connection within {config.connect_timeout:g}s (connect_timeout)"
            ) from None
        except Exception as exc:
            await self._abandon(client)
            raise ConnectorError(f"NATS at {where}: {_explain(exc)}") from None
        try:
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
                raise ConnectorError(
                    "JetStream is not enabled on the server (start nats-server with -js)"
                ) from None

            async def on_reply(msg: Any) -> None:
                waiting = link.waiting.pop(msg.subject[len(link.reply_prefix) :], None)
                if waiting is not None:
                    call, index, subject = waiting
                    call.settle(index, _reply_result(msg.data, msg.headers, subject, config.stream))

            await client.subscribe(link.reply_prefix + "*", cb=on_reply)
        except ConnectorError as exc:
            await self._close_link(link)
            raise ConnectorError(f"NATS at {where}: {exc}") from None
        except Exception as exc:
            await self._close_link(link)
            err_code = getattr(exc, "err_code", None)
            hint = _STREAM_HINTS.get(err_code, "") if isinstance(err_code, int) else ""
            raise ConnectorError(f"NATS at {where}: {_explain(exc)}{hint}") from None
        return link

    async def _abandon(self, client: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), _CLOSE_TIMEOUT_S)

    async def _close_link(self, link: _Link) -> None:
        client = link.client
        try:
            if client.is_connected:
                await asyncio.wait_for(client.flush(), _CLOSE_TIMEOUT_S)
        except Exception as exc:
            self._log.warning("flushing the NATS connection failed", error=_explain(exc))
        await self._abandon(client)
        link.fail_waiting("connection to NATS closed by the relay")


plugin = SinkPlugin(
    type="nats",
    config=NatsSinkConfig,
    factory=NatsSink,
    requires=("nats",),
    extra="nats",
    validate=stream_subjects_problems,
)
