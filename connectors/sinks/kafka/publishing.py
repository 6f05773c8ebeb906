"""How the `kafka` sink hands the events of one publish call to a producer and reads their
delivery reports back into results, without blocking the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from outbox_relay.backoff import Backoff, Retrying
from outbox_relay.connectors.sinks.kafka.config import TOPIC_NAME, KafkaSinkConfig
from outbox_relay.connectors.sinks.kafka.outcomes import Outcome, classify, kafka_error_of, kafka_text
from outbox_relay.connectors.sinks.kafka.producer import Deliveries, ProducerHandle
from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import ConnectorError
from outbox_relay.secrets import scrubber
from outbox_relay.templates import Template

if TYPE_CHECKING:
    from confluent_kafka import KafkaError, Message

# librdkafka's queue (queue.buffering.max.*) drains as delivery reports are served: a produce it
# refused as full is tried again after up to 10 ms (the relay's one retry policy, flat here).
_QUEUE_FULL = Backoff(initial=0.01, maximum=0.01)
# A publish call serves its reports after 1 ms, then every 2 ms: the reports of a batch arrive
# together (one produce request per partition), and a shorter pause only burns CPU.
_SERVE_PAUSE_MIN_S = 0.001
_SERVE_PAUSE_MAX_S = 0.002
# Template fields with one value for all events of an aggregate.
_AGGREGATE_FIELDS = frozenset({"aggregate_type", "aggregate_id"})
# Rendered topic names already checked against Kafka's naming rule; bounded for per-aggregate topics.
_VALID_TOPICS_KEPT = 10_000

#: (aggregate type, aggregate id, topic, key) of the last event addressed in a call.
_Run = tuple[str, str | None, str, str]


class _Round:
    """What one round of a publish call has handed to its producer, and what is to be retried."""

    __slots__ = ("deadline", "deliveries", "handle", "queued", "results", "retry")

    def __init__(self, handle: ProducerHandle, results: list[PublishResult], deadline: float) -> None:
        self.handle = handle
        self.results = results
        self.deadline = deadline
        self.deliveries = Deliveries()
        self.queued: dict[int, str] = {}  # event index -> topic, of the messages librdkafka took
        self.retry: list[int] = []

    def note(self, index: int, outcome: Outcome) -> None:
        """An event that did not reach the producer's queue: its result, and a retry on a new
        producer when this one is done for."""
        self.results[index] = outcome.result
        if outcome.producer_broken:
            self.retry.append(index)


class Publisher:
    """Produces events to the topic and key their templates render, and waits for their delivery
    reports. Contract of `publish_round`: every index it is given gets its result; those whose
    failure a new producer may fix are returned, in order, to be tried again."""

    def __init__(self, config: KafkaSinkConfig, log: Any, wait_bound: float) -> None:
        self._config = config
        self._log = log
        self._wait_bound = wait_bound
        self._topic = Template(config.topic, "topic")
        self._key = Template(config.key, "key")
        self._valid_topics: set[str] = set()
        #: Topic and key depend on the aggregate only: one render serves a run of its events.
        self.per_aggregate = (self._topic.fields | self._key.fields) <= _AGGREGATE_FIELDS

    async def publish_round(
        self,
        handle: ProducerHandle,
        events: Sequence[OutboxEvent],
        indexes: list[int],
        results: list[PublishResult],
        deadline: float,
    ) -> list[int]:
        """Produce `indexes`, fill in their results; return those to retry on a new producer."""
        round_ = _Round(handle, results, deadline)
        handle.waiting += 1
        try:
            await self._produce_all(round_, events, indexes)
            await _serve_reports(handle, round_.deliveries, len(round_.queued), deadline)
        finally:
            handle.waiting -= 1
        self._settle_reports(round_)
        self._fail_unreported(round_)
        if round_.retry:
            self._log.warning(
                "kafka producer can no longer deliver, replacing it",
                reason=scrubber.scrub(handle.broken or "unknown"),
                events=len(round_.retry),
            )
        return sorted(round_.retry)

    async def _produce_all(self, round_: _Round, events: Sequence[OutboxEvent], indexes: list[int]) -> None:
        # The loop runs once per event: what it needs is looked up once per call.
        handle, results, report = round_.handle, round_.results, round_.deliveries.report
        render_topic, render_key, valid_topics = self._topic.render, self._key.render, self._valid_topics
        cloudevents, per_aggregate = self._config.format == "cloudevents", self.per_aggregate
        # A call carries runs of events of one aggregate; when topic and key depend only on the
        # aggregate, a run renders them once.
        run: _Run | None = None
        for index in indexes:
            event = events[index]
            if run is not None and run[1] == event.aggregate_id and run[0] == event.aggregate_type:
                topic, key = run[2], run[3]
            else:
                topic = render_topic(event)
                if topic not in valid_topics and (invalid := self._check_topic(topic)) is not None:
                    results[index] = invalid
                    continue
                key = render_key(event)
                if per_aggregate:
                    run = (event.aggregate_type, event.aggregate_id, topic, key)
            # librdkafka takes str keys and header values (as UTF-8), and headers as a dict.
            headers = cloudevents_headers(event) if cloudevents else event.standard_headers()
            message = (handle, topic, event.payload, key, headers, partial(report, index))
            try:
                outcome = _try_produce(*message)
            except BufferError as full:
                attempt = partial(_try_produce, *message)
                outcome = await _produce_when_room(handle, attempt, full, topic, round_.deadline)
            if outcome is None:
                round_.queued[index] = topic
            else:
                round_.note(index, outcome)

    @staticmethod
    def _settle_reports(round_: _Round) -> None:
        """Turn the delivery reports that arrived into results; a report that says the producer
        is done for marks it broken and the event for a retry."""
        handle = round_.handle
        for index, err in list(round_.deliveries.reports):
            topic = round_.queued.pop(index)
            if err is None:
                round_.results[index] = None  # (it may hold the failure of an earlier round)
                continue
            outcome = classify(topic, err)
            if outcome.producer_broken and handle.broken is None:
                handle.broken = outcome.result.reason if outcome.result else err.name()
            round_.note(index, outcome)

    def _fail_unreported(self, round_: _Round) -> None:
        for index, topic in round_.queued.items():  # no report in time
            round_.results[index] = Failure(
                f"kafka topic {topic!r}: no delivery report within "
                f"{self._wait_bound:.1f}s (delivery_timeout {self._config.delivery_timeout:g}s)",
                transient=True,
            )

    def _check_topic(self, topic: str) -> Failure | None:
        """None when `topic` is a valid Kafka topic name (and remember it), else why not."""
        if not TOPIC_NAME.match(topic) or topic in (".", ".."):
            return Failure(
                f"kafka topic {topic!r} (from template {self._config.topic!r}) is not a valid topic "
                "name: 1-249 letters, digits, '.', '_', '-'",
                permanent=True,
            )
        if len(self._valid_topics) >= _VALID_TOPICS_KEPT:
            self._valid_topics.clear()
        self._valid_topics.add(topic)
        return None


async def _serve_reports(
    handle: ProducerHandle, deliveries: Deliveries, expected: int, deadline: float
) -> None:
    """Serve delivery reports from the event loop until `expected` of them are in (or the
    deadline passes), pausing briefly between rounds so librdkafka's threads get the CPU."""
    loop = asyncio.get_running_loop()
    pause = _SERVE_PAUSE_MIN_S
    while True:
        handle.serve()
        if len(deliveries.reports) >= expected or loop.time() >= deadline:
            return
        await asyncio.sleep(pause)
        pause = min(pause * 2, _SERVE_PAUSE_MAX_S)


def _try_produce(
    handle: ProducerHandle,
    topic: str,
    value: bytes,
    key: str,
    headers: dict[str, str],
    on_delivery: Callable[[KafkaError | None, Message], None],
) -> Outcome | None:
    """Queue one message; None when queued, else why it was not. Raises BufferError when
    librdkafka's queue is full."""
    try:
        # (A dict of str is what produce() takes; its stub wants the wider value type.)
        wide = cast("dict[str, str | bytes | None]", headers)
        handle.producer.produce(topic, value=value, key=key, headers=wide, on_delivery=on_delivery)
        return None
    except handle.refusal as exc:
        err = kafka_error_of(exc)
        if err is None:
            return Outcome(Failure(f"kafka topic {topic!r}: {scrubber.scrub(kafka_text(exc))}"))
        outcome = classify(topic, err)
        if outcome.producer_broken and handle.broken is None:
            handle.broken = err.name()
        return outcome
    except ConnectorError as exc:  # a concurrent call retired this producer
        return Outcome(Failure(f"kafka topic {topic!r}: {exc}", transient=True), producer_broken=True)


async def _produce_when_room(
    handle: ProducerHandle,
    attempt: Callable[[], Outcome | None],
    full: BufferError,
    topic: str,
    deadline: float,
) -> Outcome | None:
    """Repeat `attempt` (a `_try_produce` that raised `full`) until librdkafka's queue takes the
    message, serving delivery reports (which drain the queue) and yielding in between instead of
    blocking the event loop."""
    loop = asyncio.get_running_loop()
    retrying = Retrying(_QUEUE_FULL)
    while loop.time() < deadline:
        handle.serve()
        await asyncio.sleep(retrying.failed(full))
        try:
            return attempt()
        except BufferError as again:
            full = again
    return Outcome(
        Failure(f"kafka topic {topic!r}: local producer queue stayed full until the deadline", transient=True)
    )


def cloudevents_headers(event: OutboxEvent) -> dict[str, str]:
    """CloudEvents Kafka protocol binding, binary mode: `ce_` headers; the payload stays the body."""
    created_at = event.created_at_iso
    headers = event.standard_headers(created_at)
    headers.update(
        {
            "ce_specversion": "1.0",
            "ce_id": event.event_id,
            "ce_source": f"/outbox-relay/{event.aggregate_type}",
            "ce_type": event.event_type,
            "ce_time": created_at,
            "ce_subject": "" if event.aggregate_id is None else event.aggregate_id,
            "content-type": event.content_type,
        }
    )
    return headers
