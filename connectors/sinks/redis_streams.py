"""Sink `redis`: appends every event to a Redis stream with XADD (redis-py's asyncio client).

An acknowledgement is XADD returning the entry's id: the Redis server applied the write to its
memory. **Redis answers before the write is on disk**: with `appendonly yes` and `appendfsync
always` the entry is fsynced to the AOF before the reply; with the default `appendfsync everysec`
up to about a second of acknowledged entries can be lost when the server (not just the process)
crashes, and with persistence off (no AOF, no RDB) a restart loses the whole stream. Replication
is asynchronous too: a failover can lose acknowledged entries that had not reached the replica.
Choose the server's persistence settings for the guarantee you need; the relay cannot see them.

Each entry holds the fields `event_id`, `event_type`, `aggregate_type`, `aggregate_id`,
`position`, `created_at`, `content_type`, `headers` (a JSON object: the row's own headers plus
every standard header) and `payload` (the payload bytes, unchanged). With `maxlen` the stream is
trimmed approximately (`XADD ... MAXLEN ~ n`), which Redis does cheaply in whole macro nodes.

One call is one pipeline (no MULTI): every XADD of the call is written in one go and the replies
are read back in order, one round trip per call. A command Redis refuses (WRONGTYPE, OOM,
READONLY ...) fails only its own event; NOPERM (ACL), NOAUTH and WRONGPASS refuse the relay's
user, not the event: transient failures marked `setup`. A connection lost or timed out fails
every event of the call that has no reply yet, as a transient failure (a re-sent entry may then appear twice:
consumers dedupe by `event_id`). redis-py's own retries are off: the relay retries with backoff.

Redis Cluster is not supported (one server, or a primary behind a fixed address).

`redis` is imported inside methods only, so that a config naming this sink validates (and `check`
can say which extra to install) on an installation without the `redis` extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import Field, field_validator

from outbox_relay.durations import Duration
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError, Sink, SinkFeatures
from outbox_relay.logs import get_logger
from outbox_relay.registry import ConnectorConfig, SinkPlugin
from outbox_relay.secrets import parse_url_setting, redact_url, scrubber
from outbox_relay.templates import TEMPLATE_FIELDS, Template, check_template

_SCHEMES = ("redis", "rediss", "unix")
_CLOSE_TIMEOUT_S = 5.0

# Error replies (their first word) that say the server as a whole cannot take writes right now.
_TRANSIENT_REPLIES = frozenset(
    {"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"}
)
# Error replies that re-sending the same entry to the same key cannot fix.
_PERMANENT_REPLIES = frozenset({"WRONGTYPE"})
# Error replies that refuse the relay's user (its ACL, its login), not the entry: every entry
# would get the same answer until an operator fixes the user.
_REFUSED_REPLIES = frozenset({"NOPERM", "NOAUTH", "WRONGPASS"})
_HINTS = {
    "WRONGTYPE": "the key exists and is not a stream",
    "NOPERM": "the relay's Redis user may not run XADD on this key (ACL)",
    "NOAUTH": "the server wants a login: give the user and password in url",
    "WRONGPASS": "the server refused the user and password that url gives",
    "OOM": "Redis reached maxmemory; trim the streams (maxlen) or raise maxmemory",
    "READONLY": "the server is a read-only replica; point url at the primary",
    "MOVED": "this is a Redis Cluster, which the sink does not support",
}


class RedisSinkConfig(ConnectorConfig):
    type: Literal["redis"]
    url: str = Field(
        min_length=1,
        description="redis://[user:password@]host:6379/0, rediss:// for TLS, or unix:///path; "
        "the password is never shown.",
    )
    stream: str = Field(
        default="outbox.{aggregate_type}",
        min_length=1,
        description=f"Stream key template; fields: {', '.join(TEMPLATE_FIELDS)}.",
    )
    maxlen: int | None = Field(
        default=None,
        gt=0,
        le=2**63 - 1,  # (Redis reads it as a 64-bit integer and refuses every XADD above)
        description="Trim each stream to about this many entries (XADD MAXLEN ~); unset keeps everything.",
    )
    timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="Socket timeout: a call whose replies take longer counts as failed (transient).",
    )
    connect_timeout: Duration = Field(default=5.0, gt=0, description="Bound on connecting to the server.")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parse_url_setting(value, _SCHEMES)
        return value

    @field_validator("stream")
    @classmethod
    def _valid_stream(cls, value: str) -> str:
        check_template(value, "stream")
        return value


def _reply_code(exc: Exception, text: str) -> str:
    """The error code of a reply (its first word). redis-py strips it from the errors it has a
    class for (NOPERM, NOAUTH, WRONGPASS), so those are known by their class."""
    from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

    if isinstance(exc, NoPermissionError | AuthorizationError):
        return "NOPERM"
    if isinstance(exc, AuthenticationError):
        return "NOAUTH" if "required" in text.lower() else "WRONGPASS"
    return text.split(" ", 1)[0].upper() if text else ""


def _reply_failure(exc: Exception, stream: str) -> Failure:
    """The failure an error reply to one XADD (or the login before it) stands for."""
    text = scrubber.scrub(str(exc).strip())
    word = _reply_code(exc, text)
    hint = _HINTS.get(word)
    if word in _REFUSED_REPLIES and not text.upper().startswith(word):
        text = f"{word} {text}"
    reason = f"redis stream {stream!r}: {text or type(exc).__name__}" + (f": {hint}" if hint else "")
    refused = word in _REFUSED_REPLIES
    return Failure(
        reason,
        permanent=word in _PERMANENT_REPLIES,
        transient=refused or word in _TRANSIENT_REPLIES,
        setup=refused,
    )


def _explain(exc: BaseException) -> str:
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return scrubber.scrub(message)


def entry_fields(event: OutboxEvent) -> dict[str, str | bytes]:
    """The fields of the stream entry for one event."""
    created_at = event.created_at_iso
    return {
        "event_id": event.event_id,
        "event_type": event.event_type,
        "aggregate_type": event.aggregate_type,
        "aggregate_id": "" if event.aggregate_id is None else event.aggregate_id,
        "position": str(event.position),
        "created_at": created_at,
        "content_type": event.content_type,
        "headers": orjson.dumps(event.standard_headers(created_at)),
        "payload": event.payload,
    }


class RedisStreamsSink(Sink):
    kind = "redis"
    features = SinkFeatures(keeps_order=True)

    def __init__(self, config: RedisSinkConfig) -> None:
        self.config = config
        self._stream = Template(config.stream, "stream")
        scrubber.remember_from(config.url)
        self._display_url = redact_url(config.url)
        self._client: Any = None
        self._log = get_logger(sink="redis", url=self._display_url)

    # --- Sink ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is None:
            client = self._new_client()
            try:
                await self._ping(client)
            except BaseException:
                await self._close_client(client)
                raise
            self._client = client
            self._log.info("connected to Redis")

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        """XADD every event in one pipeline; None for an event whose XADD returned an id."""
        if not events:
            return []
        from redis.exceptions import AuthenticationError, AuthorizationError, RedisError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if self._client is None:
            await self.start()
        config = self.config
        render, maxlen = self._stream.render, config.maxlen
        streams = [render(event) for event in events]
        pipe = self._client.pipeline(transaction=False)
        for stream, event in zip(streams, events, strict=True):
            pipe.xadd(stream, entry_fields(event), maxlen=maxlen, approximate=True)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except (AuthenticationError, AuthorizationError) as exc:
            # The server refused the relay's login (a rotated password, a disabled user) when
            # the client reconnected: the relay's setup, not an outage and not the events.
            return [_reply_failure(exc, stream) for stream in streams]
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
            failure = Failure(f"redis at {self._display_url}: {_explain(exc)}", transient=True)
            return [failure] * len(events)
        except RedisError as exc:
            # The pipeline as a whole was refused: nothing is wrong with the events themselves,
            # so the whole call fails (retried with backoff) instead of counting against each.
            raise ConnectorError(f"redis at {self._display_url}: {_explain(exc)}") from None
        if len(replies) != len(events):  # cannot happen with redis-py; never ack on a mismatch
            raise ConnectorError(f"redis returned {len(replies)} replies for {len(events)} commands")
        results: list[PublishResult] = []
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(_reply_failure(reply, stream))
            elif reply:
                results.append(None)  # the entry id
            else:
                results.append(Failure(f"redis stream {stream!r}: XADD returned no entry id"))
        return results

    async def check(self) -> None:
        """Connect, authenticate and PING; raises ConnectorError saying what is wrong."""
        client = self._new_client()
        try:
            await self._ping(client)
        finally:
            await self._close_client(client)

    async def close(self) -> None:
        """Every call already waited for its replies; close only releases the connections."""
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)

    def describe(self) -> dict[str, object]:
        config = self.config
        return {
            "url": self._display_url,
            "stream": config.stream,
            "maxlen": config.maxlen,
            "trimming": "approximate (MAXLEN ~)" if config.maxlen else "none",
            "timeout": config.timeout,
            "connect_timeout": config.connect_timeout,
            "acknowledged_when": "XADD returned an id (before fsync unless appendfsync always)",
        }

    # --- connection ---------------------------------------------------------------------------

    def _new_client(self) -> Any:
        from redis.asyncio import Redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        config = self.config
        try:
            return Redis.from_url(
                config.url,
                socket_timeout=config.timeout,
                socket_connect_timeout=config.connect_timeout,
                retry=Retry(NoBackoff(), 0),
                client_name="outbox-relay",
            )
        except (ValueError, TypeError) as exc:
            raise ConnectorError(f"cannot use url {self._display_url}: {_explain(exc)}") from None

    async def _ping(self, client: Any) -> None:
        from redis.exceptions import AuthenticationError, RedisError

        try:
            await asyncio.wait_for(client.ping(), self.config.connect_timeout + self.config.timeout)
        except AuthenticationError as exc:
            raise ConnectorError(f"Redis at {self._display_url} refused the login: {_explain(exc)}") from None
        except TimeoutError:
            raise ConnectorError(f"Redis at {self._display_url} did not answer PING in time") from None
        except (RedisError, OSError) as exc:
            raise ConnectorError(f"Redis at {self._display_url}: {_explain(exc)}") from None

    async def _close_client(self, client: Any) -> None:
        try:
            await asyncio.wait_for(client.aclose(), _CLOSE_TIMEOUT_S)
        except Exception as exc:
            self._log.warning("closing the Redis connection failed", error=_explain(exc))


def validate_offline(config: RedisSinkConfig) -> list[tuple[str, str]]:
    """redis-py's own reading of the url, without connecting (its parser; the client is built and
    dropped), plus what that parser lets through silently: a database that is not a number in
    the path (it would use database 0), a protocol other than 2 or 3, a unix:// URL without a
    socket path. (key, reason) pairs."""
    from redis import Redis
    from redis.connection import parse_url

    shown = redact_url(config.url)
    try:
        settings = parse_url(config.url)  # type: ignore[no-untyped-call]
        Redis.from_url(config.url)
    except (ValueError, TypeError) as exc:
        return [("url", f"redis-py refuses url {shown!r}: {scrubber.scrub(str(exc))}")]
    parts = urlsplit(config.url)
    if parts.scheme == "unix":
        if not settings.get("path"):
            return [("url", f"url {shown!r} names no socket path (unix:///path/to/redis.sock)")]
    else:
        database = parts.path.strip("/")
        if database and not database.isdigit():
            return [("url", f"url {shown!r}: the database in the path must be a number, not {database!r}")]
    protocol = settings.get("protocol")
    if protocol is not None and str(protocol) not in ("2", "3"):
        return [("url", f"url {shown!r}: protocol must be 2 or 3, not {protocol!r}")]
    return []


plugin = SinkPlugin(
    type="redis",
    config=RedisSinkConfig,
    factory=RedisStreamsSink,
    requires=("redis",),
    extra="redis",
    validate=validate_offline,
)
