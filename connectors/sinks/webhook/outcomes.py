"""What a receiver's answer means for the events of a request: 2xx acknowledges; 408, 425, 429
and 5xx are transient (and a `Retry-After` on them pauses every request, see `Pause`); 401, 403
and 407 refuse the relay's setup; other 4xx refuse the event (permanent); anything else is a
plain failure. Pure but for the clock."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from outbox_relay.events import Failure
from outbox_relay.secrets import scrubber

_TRANSIENT_STATUS = frozenset({408, 425, 429})
# The receiver (or a proxy before it) refuses the relay's credentials or permissions, not the
# event: every event would get the same answer until an operator fixes the setup.
_REFUSED_STATUS = frozenset({401, 403, 407})
_BODY_EXCERPT = 200


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


def answer_reason(display_url: str, status: int, reason_phrase: str, body: str) -> str:
    """The reason of a failure for an answer other than 2xx, with an excerpt of its body."""
    reason = f"webhook {display_url} answered {status} {reason_phrase}".rstrip()
    # Scrubbed before it is cut: a cut must not leave the start of a secret it split unmasked.
    excerpt = scrubber.scrub_shortened(body.strip(), _BODY_EXCERPT)
    return f"{reason}: {excerpt}" if excerpt else reason


def is_transient(status: int) -> bool:
    """The receiver as a whole is not taking requests now (whatever the event)."""
    return status in _TRANSIENT_STATUS or status >= 500


def refusal(status: int, reason: str) -> Failure:
    """The failure of an answer that is neither 2xx nor transient."""
    if status in _REFUSED_STATUS:
        return Failure(reason, transient=True, setup=True)
    if 400 <= status < 500:
        return Failure(reason, permanent=True)
    return Failure(reason)


class Pause:
    """The receiver's Retry-After: no request goes out before it has passed."""

    def __init__(self, longest: float) -> None:
        #: The longest wait honoured (`max_retry_after`); a longer one is shortened to it.
        self.longest = longest
        #: time.monotonic() before which no request goes out.
        self.until = 0.0

    def still_waiting(self) -> Failure | None:
        """The transient failure of a request that may not go out yet, or None."""
        remaining = self.until - time.monotonic()
        if remaining <= 0:
            return None
        return Failure(
            f"not sent: the webhook asked to wait (Retry-After), {remaining:.1f}s left", transient=True
        )

    def honour(self, header: str | None) -> str:
        """Pause for a transient answer's Retry-After header, if it has a usable one; what to add
        to the failure's reason."""
        wait = retry_after_seconds(header)
        if header is None or wait is None:
            return ""
        wait = min(wait, self.longest)
        self.until = max(self.until, time.monotonic() + wait)
        return f" (Retry-After: {header.strip()}, waiting {wait:g}s)"


def explain(exc: BaseException) -> str:
    """An error as shown in failures: its type and its text, secrets masked."""
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return scrubber.scrub(message)
