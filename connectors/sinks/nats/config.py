"""The configuration of the `nats` sink: servers (credentials never shown), the subject template,
the JetStream stream and the subjects it is created with, and the waits."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from outbox_relay.connectors.sinks.nats.subjects import (
    FIELD,
    default_subjects,
    literal_prefix,
    may_cover,
    subjects_collide,
    words_problem,
)
from outbox_relay.durations import Duration
from outbox_relay.registry import ConnectorConfig
from outbox_relay.secrets import redact_url, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, check_template

_SCHEMES = ("nats", "tls", "ws", "wss")
# NATS stream names: no whitespace, no '.', '*', '>' and no path separators (they name files).
_STREAM_NAME = re.compile(r"^[^\s.*>/\\]{1,255}$")


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
        problem = words_problem(FIELD.sub("x", value), "subject template", repr(value))
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
            problem = words_problem(stream_subject, "stream subject")
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
        if not any(may_cover(stream_subject, subject) for stream_subject in value):
            prefix = literal_prefix(subject)
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
