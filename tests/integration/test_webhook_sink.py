"""The webhook sink against a real local HTTP receiver (tests/harness/webhook.py) that each test
starts itself, records every request and answers as told: 500s, 429 with Retry-After, 400, slow
answers, and an outage (stopped, then listening again on the same port). No mocks: every
acknowledgement is a real 2xx over a real connection."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

import psycopg
import pytest
from pydantic import ValidationError

pytest.importorskip("httpx")

from outbox_relay.connectors.sinks.webhook import (
    WebhookSink,
    WebhookSinkConfig,
    batch_key,
    retry_after_seconds,
)
from outbox_relay.events import Failure
from outbox_relay.outbox import write_event
from outbox_relay.registry import sink_plugins
from tests.conftest import run_cli, webhook_request_as_lines
from tests.harness.proxy import SwitchableProxy
from tests.harness.webhook import Reply, Request, WebhookReceiver
from tests.sink_support import make_events, missing_extra_message, relay_events, started_sink
from tests.support import (
    assert_complete_and_ordered,
    dead_letters,
    event_ids,
    free_port,
    http_get,
    insert_events,
    relay_config,
    run_relay_until,
    stop_relay,
    unpublished,
    wait_for,
    write_config,
)

TIMEOUT = 2.0


def _config(url: str, **settings: Any) -> WebhookSinkConfig:
    return WebhookSinkConfig(**{"type": "webhook", "url": url, "timeout": TIMEOUT, **settings})


def _started(url: str, **settings: Any) -> AbstractAsyncContextManager[WebhookSink]:
    return started_sink(WebhookSink(_config(url, **settings)))


def _lines(receiver: WebhookReceiver) -> list[dict[str, Any]]:
    return [line for request in receiver.received() for line in webhook_request_as_lines(request)]


# --- what a request carries ---------------------------------------------------------------------


async def test_each_event_is_posted_with_its_payload_idempotency_key_content_type_and_outbox_headers(
    webhook_receiver: WebhookReceiver,
) -> None:
    events = make_events(10, aggregates=10)
    events[0].headers["tracestate"] = "vendor=1"
    events[1].headers["note"] = "naïve café"  # not ASCII: sent as UTF-8 bytes
    events[2].payload, events[2].content_type = b"plain text", "text/plain"
    token = f"tok-{uuid.uuid4().hex}"
    async with _started(webhook_receiver.url, headers={"Authorization": f"Bearer {token}"}) as sink:
        assert await sink.publish(events) == [None] * 10
    by_key = {r.headers["idempotency-key"]: r for r in webhook_receiver.received()}
    assert set(by_key) == {e.event_id for e in events}
    for event in events:
        request = by_key[event.event_id]
        assert request.method == "POST"
        assert request.path == "/hook"
        assert request.body == event.payload
        assert request.headers["content-type"] == event.content_type
        assert request.headers["authorization"] == f"Bearer {token}"
        assert request.headers["x-outbox-event-id"] == event.event_id
        assert request.headers["x-outbox-event-type"] == "OrderUpdated"
        assert request.headers["x-outbox-aggregate-type"] == "order"
        assert request.headers["x-outbox-aggregate-id"] == event.aggregate_id
        assert request.headers["x-outbox-position"] == str(event.position)
        assert request.headers["x-outbox-created-at"] == event.created_at_iso
        assert request.headers["x-outbox-header-correlation_id"] == "c-1"
        assert request.headers["traceparent"] == event.headers["traceparent"]  # W3C, under its own name
    assert by_key[events[0].event_id].headers["tracestate"] == "vendor=1"
    assert by_key[events[1].event_id].headers["x-outbox-header-note"] == "naïve café"


async def test_batch_mode_posts_one_json_array_per_call_with_per_event_keys_and_a_stable_batch_key(
    webhook_receiver: WebhookReceiver,
) -> None:
    events = make_events(25, aggregates=25)
    events[4].payload, events[4].content_type = b"\x00\x01", "application/octet-stream"
    async with _started(webhook_receiver.url, mode="batch") as sink:
        assert await sink.publish(events) == [None] * 25
        assert await sink.publish(events) == [None] * 25  # the same batch again: the same key
    first, second = webhook_receiver.received()
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-outbox-batch-size"] == "25"
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"] == batch_key(events)
    body = json.loads(first.body)
    assert [item["idempotency_key"] for item in body] == [e.event_id for e in events]
    assert body[0]["payload"] == {"seq": 1, "text": "café"}
    assert body[0]["headers"]["traceparent"] == events[0].headers["traceparent"]
    assert body[4]["payload_base64"] == "AAE="
    assert batch_key(events[:24]) != batch_key(events)


async def test_a_batch_refused_for_one_event_is_narrowed_down_so_only_that_event_fails_permanently(
    webhook_receiver: WebhookReceiver,
) -> None:
    events = make_events(100, aggregates=100)
    poison = events[37].event_id
    webhook_receiver.respond_with(
        lambda request: Reply(422, b"invalid element") if poison.encode() in request.body else None
    )
    async with _started(webhook_receiver.url, mode="batch") as sink:
        results = await sink.publish(events)
    assert [i for i, r in enumerate(results) if r is not None] == [37]
    assert isinstance(results[37], Failure)
    assert results[37].permanent
    assert "422" in results[37].reason
    requests = webhook_receiver.received()
    assert len(requests) <= 1 + 2 * 7  # the batch, then two halves per level of a 100-event bisection
    accepted = [line["event_id"] for r in requests[1:] for line in webhook_request_as_lines(r)]
    assert set(accepted) >= {e.event_id for e in events} - {poison}


async def test_a_batch_the_receiver_refuses_as_such_fails_whole_after_one_split(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.respond_with(lambda _: Reply(404, b"no such hook"))
    async with _started(webhook_receiver.url, mode="batch") as sink:
        results = await sink.publish(make_events(100, aggregates=100))
    assert all(isinstance(r, Failure) and r.permanent and "404" in r.reason for r in results)
    assert len(webhook_receiver.received()) == 3  # the batch and its two halves, nothing more


async def test_a_batch_too_large_for_the_receiver_is_split_until_the_parts_are_accepted(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.respond_with(lambda request: Reply(413) if len(request.body) > 3000 else None)
    events = make_events(64, aggregates=64)
    async with _started(webhook_receiver.url, mode="batch") as sink:
        assert await sink.publish(events) == [None] * 64
    accepted = [r for r in webhook_receiver.received() if len(r.body) <= 3000]
    assert sorted(line["event_id"] for r in accepted for line in webhook_request_as_lines(r)) == sorted(
        e.event_id for e in events
    )


# --- what counts as an acknowledgement ----------------------------------------------------------


async def test_a_429_with_retry_after_is_transient_and_nothing_is_sent_before_the_wait_is_over(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.script(Reply(429, retry_after="1"))
    events = make_events(1, aggregates=1)
    async with _started(webhook_receiver.url) as sink:
        [first] = await sink.publish(events)
        refused_at = time.monotonic()
        assert isinstance(first, Failure)
        assert first.transient
        assert not first.permanent
        assert "429 Too Many Requests" in first.reason
        assert "Retry-After: 1, waiting 1s" in first.reason
        [early] = await sink.publish(events)  # the pipeline retries sooner than asked
        assert isinstance(early, Failure)
        assert early.transient
        assert "asked to wait" in early.reason
        assert await relay_events(sink, events, batch=1, deadline_s=10, pause_s=0.1) > 0
    requests = webhook_receiver.received()
    assert len(requests) == 2, "a request went out while the receiver asked to wait"
    assert requests[1].received_at - refused_at >= 0.9
    assert requests[1].headers["idempotency-key"] == events[0].event_id


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


async def test_500_and_503_are_transient_and_the_events_are_acked_once_the_receiver_recovers(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.script(Reply(500, b"database down"), Reply(503), Reply(502))
    events = make_events(6, aggregates=6)
    async with _started(webhook_receiver.url, max_concurrency=1) as sink:
        results = await sink.publish(events)
        failures = [r for r in results if r is not None]
        assert len(failures) == 3
        assert all(f.transient and not f.permanent for f in failures)
        assert "answered 500 Internal Server Error: database down" in failures[0].reason
        refused = [e for e, r in zip(events, results, strict=True) if r is not None]
        assert await relay_events(sink, refused, batch=6, deadline_s=10, pause_s=0.05) == 0
    delivered = {line["event_id"] for line in _lines(webhook_receiver)}
    assert delivered == {e.event_id for e in events}


async def test_a_400_fails_only_its_own_event_permanently_and_the_others_are_acked(
    webhook_receiver: WebhookReceiver,
) -> None:
    events = make_events(8, aggregates=8)
    poison = events[3].event_id

    def refuse_poison(request: Request) -> Reply | None:
        if request.headers["idempotency-key"] == poison:
            return Reply(400, b'{"error": "schema violation"}')
        return None

    webhook_receiver.respond_with(refuse_poison)
    async with _started(webhook_receiver.url) as sink:
        results = await sink.publish(events)
    assert [i for i, r in enumerate(results) if r is not None] == [3]
    failure = results[3]
    assert isinstance(failure, Failure)
    assert failure.permanent
    assert not failure.transient
    assert "answered 400 Bad Request" in failure.reason
    assert "schema violation" in failure.reason


@pytest.mark.parametrize("status", [401, 403, 407])
@pytest.mark.parametrize("mode", ["event", "batch"])
async def test_a_receiver_refusing_the_relays_credentials_fails_events_as_a_setup_problem_never_as_poison(
    webhook_receiver: WebhookReceiver, status: int, mode: str
) -> None:
    webhook_receiver.respond_with(lambda _: Reply(status, b"credentials refused"))
    async with _started(webhook_receiver.url, mode=mode) as sink:
        results = await sink.publish(make_events(6, aggregates=3))
    for result in results:
        assert isinstance(result, Failure), "a refusal is never an acknowledgement"
        assert result.setup
        assert result.transient
        assert not result.permanent
        assert f"answered {status}" in result.reason
    if mode == "batch":
        assert len(webhook_receiver.received()) == 1, "a refusal of the relay is not narrowed down"


async def test_a_slow_receiver_times_out_as_a_transient_failure_within_the_timeout(
    webhook_receiver: WebhookReceiver,
) -> None:
    webhook_receiver.script(Reply(200, delay=TIMEOUT + 3))
    async with _started(webhook_receiver.url) as sink:
        started = time.monotonic()
        [result] = await sink.publish(make_events(1, aggregates=1))
        took = time.monotonic() - started
    assert isinstance(result, Failure)
    assert result.transient
    assert not result.permanent
    assert "no response within 2s (timeout)" in result.reason
    assert (
        TIMEOUT - 0.1 <= took < TIMEOUT + 15
    )  # it waited for the timeout, and no longer than needed to notice


async def test_requests_in_flight_never_exceed_max_concurrency(webhook_receiver: WebhookReceiver) -> None:
    webhook_receiver.respond_with(lambda _: Reply(200, delay=0.05))
    async with _started(webhook_receiver.url, max_concurrency=4) as sink:
        started = time.monotonic()
        assert await sink.publish(make_events(40, aggregates=40)) == [None] * 40
        took = time.monotonic() - started
    assert webhook_receiver.max_in_flight == 4
    assert took >= 10 * 0.05  # 40 requests, 4 at a time


# --- outages ------------------------------------------------------------------------------------


async def test_a_receiver_outage_gives_transient_failures_and_after_it_returns_nothing_is_lost(
    webhook_receiver: WebhookReceiver,
) -> None:
    first, second, third = (make_events(50, aggregates=50, start=s) for s in (1, 51, 101))
    async with _started(webhook_receiver.url) as sink:
        assert await sink.publish(first) == [None] * 50
        webhook_receiver.stop()
        try:
            results = await sink.publish(second)
            assert all(isinstance(r, Failure) and r.transient and not r.permanent for r in results)
            assert "ConnectError" in str(results[0])
        finally:
            webhook_receiver.start()
        await relay_events(sink, second + third, batch=50, deadline_s=20, pause_s=0.05)
    delivered = _lines(webhook_receiver)
    assert assert_complete_and_ordered(delivered, {e.event_id for e in first + second + third}) == 0


# --- the relay end to end -----------------------------------------------------------------------


async def test_the_relay_dead_letters_an_event_the_receiver_refuses_with_400_and_delivers_the_rest(
    dsn: str, webhook_receiver: WebhookReceiver
) -> None:
    insert_events(dsn, 200, aggregates=10)
    with psycopg.connect(dsn, autocommit=True) as conn:
        poison = write_event(conn, "order", "order-1", "Poison", {"poison": True})
        after = write_event(conn, "order", "order-1", "After", {"n": 1})
    webhook_receiver.respond_with(
        lambda request: Reply(422, b"invalid") if request.headers["idempotency-key"] == poison else None
    )
    webhook_receiver.script(*[Reply(503, retry_after="0")] * 5)  # a short outage first: never parks
    config = relay_config(dsn, {"type": "webhook", "url": webhook_receiver.url})
    await run_relay_until(config, lambda _: unpublished(dsn) == 0, timeout=60)
    (letter,) = await dead_letters(dsn)
    assert letter.event_id == poison
    assert letter.permanent
    assert letter.attempts == 1
    assert "answered 422" in letter.error
    delivered = [line for line in _lines(webhook_receiver) if line["event_id"] != poison]
    assert_complete_and_ordered(delivered, event_ids(dsn) - {poison})
    assert after in {line["event_id"] for line in delivered}, "its aggregate moved on after parking"


# --- secrets and config -------------------------------------------------------------------------


async def test_a_secret_header_is_sent_but_masked_in_describe_and_never_logged(
    webhook_receiver: WebhookReceiver, capfd: pytest.CaptureFixture[str]
) -> None:
    token = f"tok-{uuid.uuid4().hex}"
    key = f"key-{uuid.uuid4().hex}"
    webhook_receiver.script(Reply(401, f"bad token {token}".encode()))
    settings = {"headers": {"Authorization": f"Bearer {token}", "X-Api-Key": key, "User-Agent": "shop/1"}}
    async with _started(webhook_receiver.url + f"?sig={key}", **settings) as sink:
        described = sink.describe()
        [result] = await sink.publish(make_events(1, aggregates=1))
    assert described["headers"] == {"Authorization": "***", "X-Api-Key": "***", "User-Agent": "shop/1"}
    assert "sig=***" in str(described["url"])
    assert isinstance(result, Failure)
    assert result.setup
    assert "401" in result.reason
    captured = capfd.readouterr()
    for text in (repr(described), result.reason, captured.out, captured.err):
        assert token not in text
        assert key not in text
    assert webhook_receiver.received()[0].headers["authorization"] == f"Bearer {token}"


def test_the_sink_is_registered_and_its_config_refuses_bad_settings_with_clear_reasons() -> None:
    assert sink_plugins()["webhook"].config is WebhookSinkConfig
    config = WebhookSinkConfig(type="webhook", url="https://hooks.example.com/outbox")
    assert (config.mode, config.timeout, config.max_concurrency) == ("event", 10.0, 16)
    base = {"type": "webhook", "url": "https://hooks.example.com/outbox"}
    bad = {
        "url": ("ftp://hooks.example.com/", "must start with http:// or https://"),
        "mode": ("stream", "'event' or 'batch'"),
        "headers": ({"Idempotency-Key": "x"}, "cannot be set here: it is the event id"),
        "max_concurrency": (0, "greater than or equal to 1"),
        "timeout": ("soon", "is not a duration"),
    }
    for key, (value, reason) in bad.items():
        with pytest.raises(ValidationError, match=reason):
            WebhookSinkConfig(**{**base, key: value})
    with pytest.raises(ValidationError, match="line break"):
        WebhookSinkConfig(**{**base, "headers": {"X-Evil": "a\r\nInjected: 1"}})


def test_a_missing_webhook_extra_is_reported_with_the_pip_install_line() -> None:
    message = missing_extra_message({"type": "webhook", "url": "http://127.0.0.1:9/hook"}, "httpx")
    assert message == (
        "outboxes[0].sink.type: sink type 'webhook' needs: "
        "pip install 'outbox-relay[webhook]' (missing httpx)"
    )


def test_readyz_answers_503_with_the_sink_down_while_the_receiver_is_unreachable_and_200_once_it_is_back(
    dsn: str, webhook_receiver: WebhookReceiver, start_relay: Any, tmp_path: Path
) -> None:
    """End to end over HTTP: `outbox-relay run` with the receiver behind a proxy the test cuts.
    While events wait and the receiver refuses connections, /readyz is 503 with `"sink": false`
    and /metrics has outbox_relay_up{component="sink"} 0; both recover once it is back, and
    every event reaches it once, in order per aggregate."""
    receiver_port = urlsplit(webhook_receiver.url).port
    assert receiver_port is not None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sink_up = 'outbox_relay_up{component="sink",outbox="orders"}'
    with SwitchableProxy(receiver_port) as proxy:
        url = webhook_receiver.url.replace(f":{receiver_port}", f":{proxy.port}")
        config = relay_config(dsn, {"type": "webhook", "url": url, "timeout": "2s"})
        config["http"] = {"port": port, "host": "127.0.0.1"}
        config["outboxes"][0]["retry"] = {"initial": "50ms", "max": "500ms"}
        relay = start_relay(write_config(tmp_path, config))
        insert_events(dsn, 10, aggregates=5)
        wait_for(lambda: unpublished(dsn) == 0, 60, "the events before the outage published")
        assert json.loads(http_get(base + "/readyz"))["outboxes"]["orders"]["sink"] is True
        assert f"{sink_up} 1.0" in http_get(base + "/metrics")

        proxy.switch(1)  # port 1 on loopback refuses connections
        insert_events(dsn, 20, aggregates=5)

        def down() -> bool:
            ready = json.loads(http_get(base + "/readyz"))
            return ready["ready"] is False and ready["outboxes"]["orders"]["sink"] is False

        wait_for(down, 60, "/readyz 503 with the sink down while the receiver is unreachable")
        assert f"{sink_up} 0.0" in http_get(base + "/metrics")
        with urllib.request.urlopen(base + "/healthz", timeout=5) as alive:
            assert alive.status == 200  # alive all along: not ready is not dead
        # Not raising would mean /readyz answered 2xx while the receiver was unreachable.
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(base + "/readyz", timeout=5)
        assert not_ready.value.code == 503
        assert unpublished(dsn) == 20

        proxy.switch(receiver_port)
        wait_for(
            lambda: unpublished(dsn) == 0 and json.loads(http_get(base + "/readyz"))["ready"] is True,
            60,
            "every event published and /readyz 200 again",
        )
        assert f"{sink_up} 1.0" in http_get(base + "/metrics")
        stop_relay(relay)
    assert assert_complete_and_ordered(_lines(webhook_receiver), event_ids(dsn)) == 0


def test_a_receiver_answering_401_dead_letters_nothing_turns_readiness_false_naming_the_sink_until_it_accepts(
    dsn: str, webhook_receiver: WebhookReceiver, start_relay: Any, tmp_path: Path
) -> None:
    """`outbox-relay run` against a receiver that answers 401 to everything (a revoked token):
    no event is dead-lettered however often it is retried, /readyz is 503 with a problem naming
    the sink, and outbox_relay_setup_problem{component="sink"} is 1. Once the receiver accepts
    again, every event arrives once, in order per aggregate, and the problem clears."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gauge = 'outbox_relay_setup_problem{component="sink",outbox="orders"}'
    accepted: list[Request] = []
    refusing = True

    def answer(request: Request) -> Reply | None:
        if refusing:
            return Reply(401, b'{"error": "invalid token"}')
        accepted.append(request)
        return None

    webhook_receiver.respond_with(answer)
    config = relay_config(dsn, {"type": "webhook", "url": webhook_receiver.url, "timeout": "2s"})
    config["http"] = {"port": port, "host": "127.0.0.1"}
    config["outboxes"][0]["retry"] = {"initial": "20ms", "max": "100ms"}
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 2}
    insert_events(dsn, 30, aggregates=5)
    relay = start_relay(write_config(tmp_path, config))

    def refused_as_setup() -> bool:
        try:
            ready = json.loads(http_get(base + "/readyz"))
        except (OSError, ValueError):
            return False
        problems = ready["outboxes"]["orders"].get("problems", [])
        return ready["ready"] is False and any(p["component"] == "sink" for p in problems)

    wait_for(refused_as_setup, 60, "/readyz naming the sink's setup problem")
    # Many more refusals than after_attempts: still nothing is parked.
    wait_for(lambda: len(webhook_receiver.received()) >= 50, 60, "the relay retrying the refused events")
    (problem,) = json.loads(http_get(base + "/readyz"))["outboxes"]["orders"]["problems"]
    assert problem["problem"] == "broker refused the relay"
    assert "answered 401" in problem["error"]
    assert f"{gauge} 1.0" in http_get(base + "/metrics")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/readyz", timeout=5)
    assert refused.value.code == 503
    with psycopg.connect(dsn, autocommit=True) as conn:
        (parked,) = conn.execute("SELECT count(*) FROM outbox_relay_dead_letters").fetchone() or (None,)
    assert parked == 0, "a refused credential dead-lettered events"
    assert unpublished(dsn) == 30

    refusing = False
    wait_for(
        lambda: unpublished(dsn) == 0 and json.loads(http_get(base + "/readyz"))["ready"] is True,
        60,
        "every event published and /readyz 200 once the receiver accepts",
    )
    assert f"{gauge} 0.0" in http_get(base + "/metrics")
    assert "problems" not in json.loads(http_get(base + "/readyz"))["outboxes"]["orders"]
    stop_relay(relay)
    delivered = [line for request in accepted for line in webhook_request_as_lines(request)]
    assert assert_complete_and_ordered(delivered, event_ids(dsn)) == 0, "every event once"


def _echo_every_header(status: int) -> Any:
    """A receiver that refuses every request and echoes all its headers in the body, the
    Authorization header first (as many real receivers do in their 401 and 400 answers)."""

    def reply(request: Request) -> Reply:
        headers = sorted(request.headers.items(), key=lambda item: item[0] != "authorization")
        body = "\n".join(f"{name}: {value}" for name, value in headers)
        return Reply(status, body.encode())

    return reply


async def test_credentials_in_the_webhook_url_never_show_in_any_form_in_the_dead_letter_row_logs_or_dlq(
    dsn: str, webhook_receiver: WebhookReceiver, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    user, password = "hook-user", f"p@ss w/{uuid.uuid4().hex[:12]}"
    basic = base64.b64encode(f"{user}:{password}".encode()).decode()
    forms = {
        "raw": password,
        "percent-encoded": quote(password, safe=""),
        "base64 of user:password": basic.rstrip("="),
        "base64 of the password": base64.b64encode(password.encode()).decode().rstrip("="),
    }
    url = webhook_receiver.url.replace("http://", f"http://{user}:{quote(password, safe='')}@")
    webhook_receiver.respond_with(_echo_every_header(400))
    insert_events(dsn, 1, aggregates=1)
    path = write_config(tmp_path, relay_config(dsn, {"type": "webhook", "url": url, "timeout": TIMEOUT}))
    run = run_cli("run", "--drain", "-c", str(path), env=cli_env, timeout=90)
    assert run.returncode == 0, run.stderr[-2000:]
    assert webhook_receiver.received()[0].headers["authorization"] == f"Basic {basic}"  # it was sent
    (letter,) = await dead_letters(dsn)
    assert "answered 400" in letter.error
    assert "authorization: ***" in letter.error
    shown = run_cli("dlq", "show", "-c", str(path), env=cli_env)
    listed = run_cli("dlq", "list", "-c", str(path), env=cli_env)
    assert shown.returncode == listed.returncode == 0, shown.stderr + listed.stderr
    assert "answered 400" in shown.stdout
    assert "answered 400" in listed.stdout
    # A row stored by a version that did not mask it is masked when shown.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox_relay_dead_letters SET error = error || %s",
            (" " + " ".join(forms.values()) + f" Basic {basic}",),
        )
    shown_old = run_cli("dlq", "show", "-c", str(path), env=cli_env)
    listed_old = run_cli("dlq", "list", "-c", str(path), env=cli_env)
    texts = {
        "dead-letter row": letter.error,
        "relay logs": run.stdout + run.stderr,
        "dlq show": shown.stdout + shown.stderr,
        "dlq list": listed.stdout + listed.stderr,
        "dlq show of an old row": shown_old.stdout + shown_old.stderr,
        "dlq list of an old row": listed_old.stdout + listed_old.stderr,
    }
    for where, text in texts.items():
        for form, value in forms.items():
            assert value not in text, f"{form} of the password in the {where}"


def _echoings(value: str) -> dict[str, str]:
    """`value` as a receiver may echo it: percent-encoded (quote, quote_plus), inside a JSON
    string (with and without `\\/`, as PHP's json_encode writes `/`), and as base64url."""
    dumped = json.dumps(value)[1:-1]
    return {
        "quote": quote(value, safe=""),
        "quote_plus": quote_plus(value),
        "json": dumped,
        "json with \\/": dumped.replace("/", "\\/"),
        "base64url": base64.urlsafe_b64encode(value.encode()).decode().rstrip("="),
    }


@pytest.mark.parametrize("credential", ["bearer", "basic"])
async def test_a_credential_echoed_percent_encoded_json_escaped_or_base64url_never_shows_anywhere(
    dsn: str, webhook_receiver: WebhookReceiver, tmp_path: Path, cli_env: dict[str, str], credential: str
) -> None:
    """The receiver answers 400 to each event with the Authorization header it got in one more
    encoding (one per event, so that no body is cut before its secret): none of them is in the
    dead-letter rows, the relay's logs or what `dlq list` and `dlq show` print."""
    if credential == "bearer":
        token = f"Tok/en+{uuid.uuid4().hex[:8]}Secret/Val="
        sink: dict[str, Any] = {"type": "webhook", "url": webhook_receiver.url, "timeout": TIMEOUT}
        sink["headers"] = {"Authorization": f"Bearer {token}"}
        values = {"token": token, "header": f"Bearer {token}"}
    else:
        user, password = "relay", f"pa>>ss~{uuid.uuid4().hex[:8]}"
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        url = webhook_receiver.url.replace("http://", f"http://{user}:{quote(password, safe='')}@")
        sink = {"type": "webhook", "url": url, "timeout": TIMEOUT}
        values = {"password": password, "user:password": f"{user}:{password}", "base64": basic}
        values["header"] = f"Basic {basic}"
    forms = {
        f"{form} of the {name}": text for name, v in values.items() for form, text in _echoings(v).items()
    }
    if credential == "basic":
        assert forms["quote_plus of the header"].startswith("Basic+")
        assert "%2B" in forms["quote_plus of the header"]
    order = list(forms)
    assigned: dict[str, str] = {}

    def echo(request: Request) -> Reply:
        form = assigned.setdefault(request.headers["idempotency-key"], order[len(assigned) % len(order)])
        return Reply(400, f"refused; you sent {forms[form]} as your credential".encode())

    webhook_receiver.respond_with(echo)
    insert_events(dsn, len(forms), aggregates=len(forms))
    path = write_config(tmp_path, relay_config(dsn, sink))
    run = run_cli("run", "--drain", "-c", str(path), env=cli_env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    letters = await dead_letters(dsn)
    assert len(letters) == len(forms), letters
    assert all("you sent ***" in letter.error for letter in letters), [
        x.error[-80:] for x in letters if "you sent ***" not in x.error
    ]
    shown = run_cli("dlq", "show", "-c", str(path), env=cli_env)
    listed = run_cli("dlq", "list", "-c", str(path), env=cli_env)
    assert shown.returncode == listed.returncode == 0, shown.stderr + listed.stderr
    texts = {
        "dead-letter rows": " ".join(letter.error for letter in letters),
        "relay logs": run.stdout + run.stderr,
        "dlq show": shown.stdout + shown.stderr,
        "dlq list": listed.stdout + listed.stderr,
    }
    for where, text in texts.items():
        for form, value in forms.items():
            assert value not in text, f"{form} in the {where}"


def test_a_webhook_with_credentials_in_its_url_and_an_authorization_header_is_refused_naming_the_key(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    sink = {
        "type": "webhook",
        "url": f"https://svc:{password}@hooks.example.com/outbox",
        "headers": {"Authorization": "Bearer tok-configured"},
    }
    path = write_config(tmp_path, relay_config("postgresql://localhost/db", sink))
    for command in ("check", "run"):
        result = run_cli(command, "-c", str(path), env=cli_env)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "outboxes[0].sink.headers: header Authorization conflicts with" in result.stderr
        assert "Traceback" not in result.stderr
        assert password not in result.stdout + result.stderr
        assert "tok-configured" not in result.stderr


async def test_a_receiver_that_answers_a_byte_at_a_time_fails_the_call_within_its_timeout() -> None:
    """httpx bounds each read; a receiver sending its headers a byte every half second would hold
    the call, and readiness, forever. The whole request is bounded by `timeout`."""
    import asyncio

    async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(65536)
            writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            for _ in range(120):
                await writer.drain()
                await asyncio.sleep(0.5)
                writer.write(b"x")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(dribble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _started(f"http://127.0.0.1:{port}/hook", timeout="1s") as sink:
            started = time.monotonic()
            [result] = await sink.publish(make_events(1, aggregates=1))
            took = time.monotonic() - started
    finally:
        server.close()
    assert isinstance(result, Failure), result
    assert result.transient, result
    assert "timeout" in result.reason, result
    assert took < 10, f"the call took {took:.1f}s: not bounded by its timeout"  # liveness, not speed


def test_check_masks_static_headers_of_any_name_but_the_well_known_plain_ones(tmp_path: Path) -> None:
    secrets = {
        "x-functions-key": "FuncKeySecret123",
        "Ocp-Apim-Subscription-Key": "ApimSecret456",
        "X-Access-Key": "AccessSecret789",
        "X-Vendor": "VendorSecret000",
    }
    headers = {**secrets, "User-Agent": "shop/1.0", "Accept": "application/json"}
    config = relay_config(
        "postgresql://localhost/db", {"type": "webhook", "url": "http://h/x", "headers": headers}
    )
    path = write_config(tmp_path, config)
    for extra in ((), ("--json",)):
        result = run_cli("check", "-c", str(path), *extra)
        assert result.returncode == 0, result.stderr
        for value in secrets.values():
            assert value not in result.stdout
        assert "shop/1.0" in result.stdout, "a plain header stays readable"
