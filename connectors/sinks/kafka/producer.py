"""The `kafka` sink's transport: one librdkafka producer, the thread that polls it while no
publish call does, and the delivery reports of one call."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from outbox_relay.connectors.sinks.kafka.config import ProducerValue
from outbox_relay.connectors.sinks.kafka.outcomes import kafka_text
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message, Producer

#: How long the poll thread waits per round while it polls (no publish call is waiting).
_IDLE_POLL_S = 0.05
#: How long a retiring producer waits for the reports of what it purged.
_PURGED_REPORTS_S = 5.0


class _LibrdkafkaLog:
    """Receives librdkafka's own log lines (instead of raw stderr) and forwards them to structlog."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def log(self, level: int, fmt: str, *args: object) -> None:
        text = scrubber.scrub(fmt % args if args else fmt)
        # confluent-kafka maps syslog levels to logging levels: 10 debug ... 50 critical.
        if level >= 30:
            self._log.warning("librdkafka", detail=text)
        elif level >= 20:
            self._log.info("librdkafka", detail=text)
        else:
            self._log.debug("librdkafka", detail=text)


class Deliveries:
    """The delivery reports of one publish call, as (index of the event, error or None).

    Whichever thread polls the producer runs the callbacks; list.append is atomic under the GIL,
    so reports served by the event loop and by the idle poll thread never lose one another."""

    __slots__ = ("reports",)

    def __init__(self) -> None:
        self.reports: list[tuple[int, KafkaError | None]] = []

    def report(self, index: int, err: KafkaError | None, _message: Message) -> None:
        self.reports.append((index, err))


class ProducerHandle:
    """One librdkafka producer plus a thread that polls it while no publish call does.

    Publish calls serve their own delivery reports from the event loop (`serve`): a report
    served by another thread has to take the GIL from the busy event loop once per message, and
    that hand-over costs more than the report itself. The thread polls only while no call is
    waiting (for error and log callbacks, and reports of calls that gave up), and on `retire()`
    turns into a bounded flush; it then purges what is left (reported as failures) and drops
    the producer.
    """

    def __init__(self, settings: Mapping[str, ProducerValue], log: Any) -> None:
        from confluent_kafka import KafkaException, Producer

        self._log = log
        #: Why this producer cannot deliver any more; None while it can.
        self.broken: str | None = None
        #: Publish calls now serving their own reports; only the event loop changes it.
        self.waiting = 0
        #: What produce() raises when librdkafka refuses a message (imported once, not per message).
        self.refusal: type[KafkaException] = KafkaException
        conf: dict[str, Any] = dict(settings)
        conf["error_cb"] = self._on_error
        conf["logger"] = _LibrdkafkaLog(log)
        try:
            self._producer: Producer | None = Producer(conf)
        except (KafkaException, ValueError, TypeError) as exc:
            raise ConnectorError(
                f"kafka producer settings refused: {scrubber.scrub(kafka_text(exc))}"
            ) from None
        self._retire_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="kafka-sink-poll", daemon=True)
        self._thread.start()

    @property
    def producer(self) -> Producer:
        if self._producer is None or self._retire_at is not None:
            raise ConnectorError("kafka producer is closed")
        return self._producer

    def serve(self) -> None:
        """Run the delivery reports that have arrived, without waiting (from the event loop)."""
        producer = self._producer
        if producer is not None and self._retire_at is None:
            producer.poll(0)

    def retire(self, within: float) -> None:
        """Stop taking messages; deliver what is queued for at most `within` seconds, then purge."""
        if self._retire_at is None:
            self._retire_at = time.monotonic() + within

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    # --- poll thread ---------------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.broken = f"{err.name()}: {err.str()}"
            self._log.error("kafka producer failed, replacing it", error=scrubber.scrub(self.broken))
        elif err.name() == "_ALL_BROKERS_DOWN":
            self._log.warning("kafka brokers unreachable", error=scrubber.scrub(err.str()))
        else:
            self._log.debug("kafka client error", error=scrubber.scrub(f"{err.name()}: {err.str()}"))

    def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        try:
            while self._retire_at is None:
                if self.waiting:
                    time.sleep(_IDLE_POLL_S)
                else:
                    producer.poll(_IDLE_POLL_S)
            remaining = self._retire_at - time.monotonic()
            if remaining > 0 and len(producer) > 0:
                # flush() sends at once, without waiting out linger.ms, and serves the reports.
                producer.flush(remaining)
            # What is still queued will not be delivered in time: fail it now rather than never.
            producer.purge()
            # The purged messages' reports come back through librdkafka's queue, some a moment
            # after purge() returns: serve until every one is in (flush() returns once the
            # queue holds nothing), or the callers waiting on them wait out their deadline.
            producer.flush(_PURGED_REPORTS_S)
        except Exception as exc:  # a bug here must not leave callers waiting silently
            self._log.error("kafka poll thread failed", error=scrubber.scrub(f"{type(exc).__name__}: {exc}"))
            self.broken = f"poll thread failed: {exc}"
        finally:
            self._producer = None
