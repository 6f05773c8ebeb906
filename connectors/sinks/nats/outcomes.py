"""What the NATS server's answers mean for an event: a JetStream reply to a publish (a PubAck,
an error with its code, no responders), a permissions violation, an error while connecting or
declaring the stream. Pure, no server."""

from __future__ import annotations

import re

import orjson

from outbox_relay.events import Failure, PublishResult
from outbox_relay.secrets import scrubber

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


def reply_result(data: bytes, headers: dict[str, str] | None, subject: str, stream: str) -> PublishResult:
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
        return _unexpected(data, subject)
    if not isinstance(reply, dict):
        return _unexpected(data, subject)
    error = reply.get("error")
    if isinstance(error, dict):
        return _refusal(error, subject)
    return None if "seq" in reply else _unexpected(data, subject)


def _unexpected(data: bytes, subject: str) -> Failure:
    return Failure(f"unexpected reply to a publish on {subject!r}: {data[:200]!r}")


def _refusal(error: dict[str, object], subject: str) -> Failure:
    """The failure a JetStream error reply stands for."""
    code, err_code = error.get("code"), error.get("err_code")
    description = str(error.get("description", "")).strip()
    hint = _HINTS.get(err_code) if isinstance(err_code, int) else None
    reason = f"JetStream refused the message on {subject!r}: {description} (code {code}, err_code {err_code})"
    if hint:
        reason += f": {hint}"
    transient = err_code in _TRANSIENT_ERR_CODES or code == 503
    return Failure(reason, permanent=code == 400 and not transient, transient=transient)


def stream_hint(exc: BaseException) -> str:
    """What to do about an error JetStream gave while the stream was looked up or created."""
    err_code = getattr(exc, "err_code", None)
    return _STREAM_HINTS.get(err_code, "") if isinstance(err_code, int) else ""


def explain(exc: BaseException) -> str:
    """An error as shown in logs and failures: its type and its text, secrets masked."""
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text and text != type(exc).__name__ else type(exc).__name__
    return scrubber.scrub(message)
