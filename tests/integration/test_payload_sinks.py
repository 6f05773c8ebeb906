"""Every sink delivers every payload byte for byte: the same awkward payloads (big integers,
decimals with trailing zeros, exponents, -0, escapes, \\u0000, surrogate pairs, line breaks in a
`json` document, 5 MB) through each sink against its real server, read back as bytes."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from outbox_relay.connectors.sinks.file import FileSink, FileSinkConfig
from outbox_relay.connectors.sinks.kafka import KafkaSink, KafkaSinkConfig
from outbox_relay.connectors.sinks.nats import NatsSink, NatsSinkConfig
from outbox_relay.connectors.sinks.rabbitmq import RabbitMQSink, RabbitMQSinkConfig
from outbox_relay.connectors.sinks.redis_streams import RedisSinkConfig, RedisStreamsSink
from outbox_relay.connectors.sinks.stdout import StdoutSink, StdoutSinkConfig
from outbox_relay.connectors.sinks.webhook import WebhookSink, WebhookSinkConfig
from outbox_relay.events import OutboxEvent
from outbox_relay.interfaces import Sink
from tests.conftest import kafka_headers
from tests.harness.kafka import KafkaBroker
from tests.harness.nats import NatsServer, read_stream, start_nats
from tests.harness.rabbitmq import RabbitBroker, declare_queue, delete, drain_queue
from tests.harness.redis import RedisServer, stream_entries, unique_prefix
from tests.harness.webhook import WebhookReceiver
from tests.payloads import BYTES_PAYLOAD, JSON_PAYLOADS, TEXT_PAYLOAD, in_a_line, read_line

_TEXT = "text/plain; charset=utf-8"
_BINARY = "application/octet-stream"

# name -> (payload, content type)
_PAYLOADS: dict[str, tuple[bytes, str]] = {
    **{name: (payload, "application/json") for name, payload in JSON_PAYLOADS.items()},
    "text": (TEXT_PAYLOAD, _TEXT),
    "bytes": (BYTES_PAYLOAD, _BINARY),
}


def _events() -> list[OutboxEvent]:
    return [
        OutboxEvent(
            position,
            f"00000000-0000-0000-0000-{position:012d}",
            "payload",
            name,  # one aggregate each
            "Checked",
            payload,
            {"correlation_id": name},
            1_700_000_000.0 + position,
            content_type=content_type,
        )
        for position, (name, (payload, content_type)) in enumerate(_PAYLOADS.items(), start=1)
    ]


# Each reader returns {event_id: payload as delivered}. Brokers carry the body as bytes; the
# line-based formats are checked against what a line must hold for each kind of payload.
Read = Callable[[], dict[str, bytes]]
# A sink and its reader, yielded once; closing the generator cleans up what it set up.
Backend = Generator[tuple[Sink, Read], None, None]


def _ids() -> dict[str, str]:
    return {e.aggregate_id or "": e.event_id for e in _events()}


def _from_line(line: bytes) -> tuple[str, bytes]:
    event_id, payload = read_line(line)
    # Text is embedded as a JSON string: compare the text it stands for.
    return event_id, json.loads(payload).encode() if event_id == _ids()["text"] else payload


def _lines_of(path: Path) -> dict[str, bytes]:
    return dict(_from_line(line) for line in path.read_bytes().split(b"\n") if line)


def _file(tmp_path: Path) -> Backend:
    path = tmp_path / "events.jsonl"
    yield FileSink(FileSinkConfig(type="file", path=str(path))), lambda: _lines_of(path)


def _stdout(tmp_path: Path) -> Backend:
    path = tmp_path / "stdout.jsonl"
    with path.open("wb") as stream:
        yield StdoutSink(StdoutSinkConfig(type="stdout"), stream=stream), lambda: _lines_of(path)


def _kafka(kafka: KafkaBroker) -> Backend:
    yield from _kafka_with(kafka, cloudevents=False)


def _kafka_with(kafka: KafkaBroker, *, cloudevents: bool) -> Backend:
    topic = f"payload-{uuid.uuid4().hex}"
    kafka.create_topic(topic, partitions=1)
    sink = KafkaSink(
        KafkaSinkConfig(
            type="kafka",
            bootstrap_servers=kafka.bootstrap_servers,
            topic=topic,
            producer={"message.max.bytes": 16_000_000},  # (librdkafka's default is 1 MB)
            delivery_timeout=30,
            format="cloudevents" if cloudevents else "raw",
        )
    )

    def read() -> dict[str, bytes]:
        messages = kafka.consume_all(topic, len(_PAYLOADS), timeout=30)
        return {kafka_headers(m)["event_id"]: m["value"] or b"" for m in messages}

    yield sink, read


def _kafka_cloudevents(kafka: KafkaBroker) -> Backend:
    yield from _kafka_with(kafka, cloudevents=True)  # (binary mode: the payload stays the body)


def _rabbitmq(rabbitmq: RabbitBroker) -> Backend:
    exchange, queue = f"payload-{uuid.uuid4().hex}", f"payload-{uuid.uuid4().hex}"
    sink = RabbitMQSink(RabbitMQSinkConfig(type="rabbitmq", url=rabbitmq.url, exchange=exchange))
    declare_queue(rabbitmq.url, queue, exchange, "#", exchange_type="topic")

    def read() -> dict[str, bytes]:
        messages = drain_queue(rabbitmq.url, queue, len(_PAYLOADS), timeout=30)
        return {m["headers"]["event_id"]: m["body"] for m in messages}

    try:
        yield sink, read
    finally:
        delete(rabbitmq.url, queues=[queue], exchanges=[exchange])


def _nats(big_nats: NatsServer) -> Backend:
    stream = f"PAYLOAD_{uuid.uuid4().hex}"
    subject = f"payload-{uuid.uuid4().hex}" + ".{aggregate_id}"
    sink = NatsSink(NatsSinkConfig(type="nats", servers=big_nats.url, stream=stream, subject=subject))

    def read() -> dict[str, bytes]:
        return {headers["event_id"]: data for _, headers, data in read_stream(big_nats.url, stream)}

    try:
        yield sink, read
    finally:
        big_nats.delete_stream(stream)


def _redis(redis_server: RedisServer) -> Backend:
    prefix = unique_prefix("payload")
    sink = RedisStreamsSink(RedisSinkConfig(type="redis", url=redis_server.url, stream=prefix))

    def read() -> dict[str, bytes]:
        return {f[b"event_id"].decode(): f[b"payload"] for _, f in stream_entries(redis_server.url, prefix)}

    try:
        yield sink, read
    finally:
        redis_server.delete_matching(f"{prefix}*")


def _webhook(webhook_receiver: WebhookReceiver) -> Backend:
    webhook_receiver.clear()
    sink = WebhookSink(WebhookSinkConfig(type="webhook", url=webhook_receiver.url, mode="event"))

    def read() -> dict[str, bytes]:
        return {r.headers["x-outbox-event-id"]: r.body for r in webhook_receiver.received()}

    yield sink, read


def _webhook_batch(webhook_receiver: WebhookReceiver) -> Backend:
    webhook_receiver.clear()
    sink = WebhookSink(WebhookSinkConfig(type="webhook", url=webhook_receiver.url, mode="batch"))

    def read() -> dict[str, bytes]:
        delivered: dict[str, bytes] = {}
        decoder = json.JSONDecoder()
        for request in webhook_receiver.received():
            # The body is a JSON array of objects shaped like file-sink lines: cut out each one.
            text = request.body.decode()
            at = 1
            while text[at] != "]":
                _, end = decoder.raw_decode(text, at)
                event_id, payload = _from_line(text[at:end].encode())
                delivered[event_id] = payload
                at = end + 1 if text[end] == "," else end
        return delivered

    yield sink, read


_SINKS: dict[str, Callable[..., Backend]] = {
    "file": _file,
    "stdout": _stdout,
    "kafka": _kafka,
    "kafka-cloudevents": _kafka_cloudevents,
    "rabbitmq": _rabbitmq,
    "nats": _nats,
    "redis": _redis,
    "webhook": _webhook,
    "webhook-batch": _webhook_batch,
}
_LINE_BASED = {"file", "stdout", "webhook-batch"}


@pytest.fixture(scope="module")
def big_nats() -> Iterator[NatsServer]:
    """A private NATS server that takes 8 MB messages (the default limit is 1 MB)."""
    pytest.importorskip("nats")
    with start_nats(max_payload=8 * 1024 * 1024) as server:
        yield server


def _expected(name: str, sink: str) -> bytes:
    payload, content_type = _PAYLOADS[name]
    return in_a_line(payload) if sink in _LINE_BASED and content_type == "application/json" else payload


async def test_every_sink_delivers_every_payload_byte_for_byte(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import inspect

    events = _events()
    ids = _ids()
    wrong: list[str] = []
    for kind, make in _SINKS.items():
        fixtures = {
            name: tmp_path / kind if name == "tmp_path" else request.getfixturevalue(name)
            for name in inspect.signature(make).parameters
        }
        if "tmp_path" in fixtures:
            os.makedirs(fixtures["tmp_path"])
        backend = make(**fixtures)
        sink, read = next(backend)
        try:
            await sink.start()
            assert await sink.publish(events) == [None] * len(events), kind
            await sink.close()
            delivered = read()
        finally:
            backend.close()
        for name in _PAYLOADS:
            got, want = delivered.get(ids[name]), _expected(name, kind)
            if got != want:
                shown = "missing" if got is None else f"{len(got)} bytes {got[:80]!r}"
                wrong.append(f"{kind} {name}: got {shown}, want {len(want)} bytes {want[:80]!r}")
    assert not wrong, "payloads changed on the way:\n" + "\n".join(wrong)
