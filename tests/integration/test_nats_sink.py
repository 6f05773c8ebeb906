"""The NATS JetStream sink against a real nats-server (RELAY_TEST_NATS_URL, the server on
127.0.0.1:4222, or a private one). No mocks: every acknowledgement is a real PubAck and every
assertion about a stream reads its messages back. Tests that pause or restart the server use a
private server of this module; every test uses streams and subjects of its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

pytest.importorskip("nats")

from outbox_relay.connectors.sinks.nats import NatsSink, NatsSinkConfig, default_subjects
from outbox_relay.events import Failure
from outbox_relay.interfaces import ConnectorError
from outbox_relay.registry import sink_plugins
from tests.conftest import nats_message_as_line
from tests.harness.nats import NatsServer, read_stream, run_async, start_nats
from tests.sink_support import (
    make_events,
    missing_extra_message,
    relay_events,
    relay_rounds_during,
    started_sink,
    stop_and_start,
)
from tests.support import (
    assert_complete_and_ordered,
    event_ids,
    insert_events,
    relay_config,
    run_relay_until,
    unpublished,
)

ACK_TIMEOUT = 2.0
CONNECT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def private_nats() -> Iterator[NatsServer]:
    """A server of this module's own, to pause and restart."""
    with start_nats(private=True) as server:
        yield server


class Names:
    def __init__(self) -> None:
        token = uuid.uuid4().hex[:10]
        self.stream = f"RELAYTEST_{token}"
        self.prefix = f"relaytest-{token}"

    @property
    def subject(self) -> str:
        return self.prefix + ".{aggregate_type}.{event_type}"


@pytest.fixture
def names(nats_server: NatsServer, private_nats: NatsServer) -> Iterator[Names]:
    created = Names()
    try:
        yield created
    finally:
        for server in (nats_server, private_nats):
            server.delete_stream(created.stream)


def _config(url: str, names: Names, **settings: Any) -> NatsSinkConfig:
    values: dict[str, Any] = {
        "type": "nats",
        "servers": url,
        "stream": names.stream,
        "subject": names.subject,
        "ack_timeout": ACK_TIMEOUT,
        "connect_timeout": CONNECT_TIMEOUT,
        "reconnect_wait": 0.2,
        **settings,
    }
    return NatsSinkConfig(**values)


def _started(url: str, names: Names, **settings: Any) -> AbstractAsyncContextManager[NatsSink]:
    return started_sink(NatsSink(_config(url, names, **settings)))


_USERS = """
authorization {
  users = [
    {user: admin, password: admin-pw}
    {user: relay, password: relay-pw-secret,
     permissions: {publish: {allow: [">"], deny: ["denied.>"]}, subscribe: {allow: ["_INBOX.>"]}}}
  ]
}
"""


@pytest.fixture(scope="module")
def nats_with_users() -> Iterator[NatsServer]:
    """A private server whose user `relay` may not publish on `denied.>`."""
    with start_nats(private=True, config=_USERS) as server:
        yield server


async def test_a_subject_the_user_may_not_publish_on_fails_events_as_a_setup_problem_not_an_outage(
    nats_with_users: NatsServer,
) -> None:
    token = uuid.uuid4().hex[:10]
    url = nats_with_users.url.replace("nats://", "nats://relay:relay-pw-secret@")
    settings: dict[str, Any] = {
        "type": "nats",
        "servers": url,
        "stream": f"DENIED_{token}",
        "subject": "denied.{aggregate_type}",
        "ack_timeout": ACK_TIMEOUT,
        "connect_timeout": CONNECT_TIMEOUT,
        "reconnect_wait": 0.2,
    }
    started = time.monotonic()
    async with started_sink(NatsSink(NatsSinkConfig(**settings))) as sink:
        for _ in range(2):  # and again on the connection made after the refusal
            results = await sink.publish(make_events(3, aggregates=3))
            for result in results:
                assert isinstance(result, Failure), "a refused publish is never an acknowledgement"
                assert result.setup, result
                assert result.transient, result
                assert not result.permanent, result
                assert "ermissions violation" in result.reason.lower() or "Permissions" in result.reason
                assert "relay-pw-secret" not in result.reason
    assert time.monotonic() - started < 30, "the refusal does not hang"


def _delivered(url: str, names: Names) -> list[dict[str, Any]]:
    return [nats_message_as_line(headers, data) for _, headers, data in read_stream(url, names.stream)]


# --- delivery -----------------------------------------------------------------------------------


async def test_every_event_is_stored_on_its_subject_with_nats_msg_id_and_the_standard_headers(
    nats_server: NatsServer, names: Names
) -> None:
    events = make_events(20, aggregates=5)
    events[0].headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with _started(nats_server.url, names) as sink:
        assert await sink.publish(events) == [None] * 20
    stored = read_stream(nats_server.url, names.stream)
    assert len(stored) == 20
    by_id = {headers["Nats-Msg-Id"]: (subject, headers, data) for subject, headers, data in stored}
    for event in events:
        subject, headers, data = by_id[event.event_id]
        assert subject == f"{names.prefix}.order.OrderUpdated"
        assert data == event.payload
        assert headers["event_id"] == event.event_id
        assert headers["position"] == str(event.position)
        assert headers["aggregate_id"] == event.aggregate_id
        assert headers["traceparent"] == event.headers["traceparent"]
        assert headers["Content-Type"] == "application/json"


async def test_a_resent_event_is_acked_again_but_stored_once_thanks_to_the_nats_msg_id(
    nats_server: NatsServer, names: Names
) -> None:
    events = make_events(50, aggregates=50)
    async with _started(nats_server.url, names) as sink:
        assert await sink.publish(events) == [None] * 50
        assert await sink.publish(events[:10]) == [None] * 10  # a retry after a lost PubAck
    # A relay restart: a new connection sends what it cannot know was stored.
    async with _started(nats_server.url, names) as sink:
        assert await sink.publish(events[5:30]) == [None] * 25
    stored = read_stream(nats_server.url, names.stream)
    assert sorted(h["Nats-Msg-Id"] for _, h, _ in stored) == sorted(e.event_id for e in events)


async def test_a_subject_no_stream_listens_on_fails_permanently_naming_it_while_the_rest_are_acked(
    nats_server: NatsServer, names: Names
) -> None:
    good = make_events(3, aggregates=3)
    stray = make_events(1, aggregates=1, start=10, aggregate_type="invoice")[0]
    # The stream only takes order subjects: core NATS accepts the invoice message, but no stream
    # stores it and no PubAck comes, so it must not count as acknowledged. Nor is it the event's
    # fault: it waits, a setup problem (and JetStream answers so for a moment after a restart).
    async with _started(nats_server.url, names, subjects=[f"{names.prefix}.order.>"]) as sink:
        results = await sink.publish([good[0], stray, good[1], good[2]])
    assert results[0] is None
    assert results[2] is None
    assert results[3] is None
    failure = results[1]
    assert isinstance(failure, Failure)
    assert failure.setup
    assert failure.transient
    assert not failure.permanent
    assert f"{names.prefix}.invoice.OrderUpdated" in failure.reason
    assert "no JetStream stream matches subject" in failure.reason
    assert len(read_stream(nats_server.url, names.stream)) == 3


async def test_a_subject_owned_by_another_stream_is_refused_because_the_expected_stream_header_differs(
    nats_server: NatsServer, names: Names
) -> None:
    other = Names()
    async with _started(nats_server.url, other):  # creates another stream over other's subjects
        pass
    try:
        subjects = [f"{names.prefix}.>"]  # a stream of its own, so as not to overlap with other's
        async with _started(nats_server.url, names, subjects=subjects):
            pass
        # (declare: false: a stream the relay declares must cover the subject, which check refuses)
        async with _started(nats_server.url, names, subject=other.subject, declare=False) as sink:
            [result] = await sink.publish(make_events(1, aggregates=1))
        assert isinstance(result, Failure)
        assert result.permanent
        assert "expected stream does not match" in result.reason
    finally:
        nats_server.delete_stream(other.stream)


async def test_an_event_with_an_empty_subject_token_fails_permanently_and_its_neighbours_are_acked(
    nats_server: NatsServer, names: Names
) -> None:
    events = make_events(2, aggregates=2)
    events[1].aggregate_type = ""
    async with _started(nats_server.url, names) as sink:
        results = await sink.publish(events)
    assert results[0] is None
    assert isinstance(results[1], Failure)
    assert results[1].permanent
    assert "empty token" in results[1].reason


# --- PubAck required: hung and restarted servers ------------------------------------------------


async def test_without_a_puback_nothing_is_acked_a_hung_server_gives_transient_failures_in_bounded_time(
    private_nats: NatsServer, names: Names
) -> None:
    events = make_events(30, aggregates=30)
    async with _started(private_nats.url, names) as sink:
        assert await sink.publish(events[:10]) == [None] * 10
        private_nats.pause()
        try:
            started = time.monotonic()
            results = await sink.publish(events[10:20])
            took = time.monotonic() - started
        finally:
            private_nats.resume()
        assert all(isinstance(r, Failure) and r.transient and not r.permanent for r in results), results
        assert "no PubAck" in str(results[0])
        assert took < ACK_TIMEOUT + 15  # liveness: bounded, not a speed figure
        # Once it answers again, the same events go through; those the hung server did store
        # after all are deduplicated by their Nats-Msg-Id.
        assert await relay_events(sink, events[10:], batch=30, deadline_s=20) == 0
    stored = read_stream(private_nats.url, names.stream)
    assert sorted(h["Nats-Msg-Id"] for _, h, _ in stored) == sorted(e.event_id for e in events)


async def test_a_server_restart_during_publishing_loses_nothing_and_jetstream_drops_every_resent_duplicate(
    private_nats: NatsServer, names: Names
) -> None:
    restart = stop_and_start(private_nats, after_s=0.3, down_s=1.0)
    async with _started(private_nats.url, names) as sink:
        events, failed = await relay_rounds_during(sink, restart, aggregates=100, between_s=0.02)
    # The restart happened while rounds were being published (the disturbance returned without
    # error before the last three rounds); whether a round failed depends on timing, so it is
    # not asserted. What is asserted: nothing was lost.
    del failed
    delivered = _delivered(private_nats.url, names)
    # At-least-once from the relay, but every re-send carried the same Nats-Msg-Id within the
    # duplicate window: the stream holds each event exactly once, each aggregate in order.
    assert assert_complete_and_ordered(delivered, {e.event_id for e in events}) == 0
    assert len(delivered) == len(events)


async def test_a_stopped_server_makes_start_fail_with_a_clear_error_and_publish_reports_transient_failures(
    private_nats: NatsServer, names: Names
) -> None:
    async with _started(private_nats.url, names) as sink:
        private_nats.stop()
        try:
            results = await sink.publish(make_events(5, aggregates=5))
            assert all(isinstance(r, Failure) and r.transient for r in results)
            with pytest.raises(ConnectorError, match=r"no connection within 2s \(connect_timeout\)"):
                await NatsSink(_config(private_nats.url, names)).start()
        finally:
            private_nats.start()
        # nats-py reconnects by itself: the same sink publishes again once the server is back.
        await relay_events(sink, make_events(5, aggregates=5, start=6), batch=5, deadline_s=20)


# --- the stream ---------------------------------------------------------------------------------


async def test_declare_false_refuses_a_missing_stream_and_declare_true_creates_it_with_the_derived_subjects(
    nats_server: NatsServer, names: Names
) -> None:
    with pytest.raises(
        ConnectorError, match=r"stream 'RELAYTEST_\w+' does not exist \(declare: false needs it"
    ):
        await NatsSink(_config(nats_server.url, names, declare=False)).check()
    await NatsSink(_config(nats_server.url, names, duplicate_window="30s")).check()  # creates it

    async def info() -> Any:
        import nats

        client = await nats.connect(nats_server.url)
        try:
            return await client.jetstream().stream_info(names.stream)
        finally:
            await client.close()

    config = run_async(info).config
    assert config.subjects == [f"{names.prefix}.*.>"]
    assert config.duplicate_window == 30.0
    await NatsSink(_config(nats_server.url, names, declare=False)).check()


async def test_credentials_in_server_urls_never_appear_in_describe_errors_or_logs(
    capfd: pytest.CaptureFixture[str],
) -> None:
    password, token = f"pw-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    sink = NatsSink(
        NatsSinkConfig(
            type="nats",
            servers=f"nats://app:{password}@127.0.0.1:1, nats://{token}@127.0.0.1:2",
            connect_timeout=1,
            reconnect_wait=0.2,
        )
    )
    texts = [repr(sink.describe())]
    with pytest.raises(ConnectorError) as refused:
        await sink.start()
    texts.append(str(refused.value))
    captured = capfd.readouterr()
    texts += [captured.out, captured.err]
    for text in texts:
        assert password not in text
        assert token not in text
    assert "nats://app:***@127.0.0.1:1" in texts[0]
    assert "nats://***@127.0.0.1:2" in texts[0]


# --- the relay end to end -----------------------------------------------------------------------


async def test_the_relay_drains_an_outbox_into_jetstream_each_aggregate_in_order(
    dsn: str, nats_server: NatsServer, names: Names
) -> None:
    insert_events(dsn, 500, aggregates=20)
    config = relay_config(
        dsn, {"type": "nats", "servers": nats_server.url, "stream": names.stream, "subject": names.subject}
    )
    await run_relay_until(config, lambda relay: relay.pipelines[0].published >= 500)
    assert unpublished(dsn) == 0
    delivered = _delivered(nats_server.url, names)
    assert assert_complete_and_ordered(delivered, event_ids(dsn)) == 0


# --- config -------------------------------------------------------------------------------------


def test_the_sink_is_registered_and_its_config_refuses_bad_settings_with_clear_reasons() -> None:
    assert sink_plugins()["nats"].config is NatsSinkConfig
    config = NatsSinkConfig(type="nats", servers="127.0.0.1:4222, tls://nats-2:4222")
    assert config.servers == ["nats://127.0.0.1:4222", "tls://nats-2:4222"]
    assert (config.stream, config.subject, config.ack_timeout) == (
        "OUTBOX",
        "outbox.{aggregate_type}.{event_type}",
        10.0,
    )
    assert config.stream_subjects() == ["outbox.*.>"]
    assert default_subjects("{aggregate_type}.events") == ["*.events"]
    assert default_subjects("fixed") == ["fixed"]
    base = {"type": "nats", "servers": ["nats://127.0.0.1:4222"]}
    bad = {
        "subject": ("{tenant}.x", "unknown field {tenant}"),
        "stream": ("OUT.BOX", "not a valid JetStream stream name"),
        "servers": ("http://nats:4222", "must start with one of nats, tls, ws, wss://"),
        "ack_timeout": ("soon", "is not a duration"),
    }
    for key, (value, reason) in bad.items():
        with pytest.raises(ValidationError, match=reason.replace("{", r"\{").replace("}", r"\}")):
            NatsSinkConfig(**{**base, key: value})
    with pytest.raises(ValidationError, match="has whitespace or a wildcard"):
        NatsSinkConfig(**{**base, "subject": "outbox.*.{event_type}"})


def test_a_missing_nats_extra_is_reported_with_the_pip_install_line(tmp_path: Path) -> None:
    message = missing_extra_message({"type": "nats", "servers": "127.0.0.1:4222"}, "nats")
    assert message == (
        "outboxes[0].sink.type: sink type 'nats' needs: pip install 'outbox-relay[nats]' (missing nats)"
    )
