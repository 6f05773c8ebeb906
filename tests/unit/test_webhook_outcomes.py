"""What a webhook receiver's answer means, and its Retry-After pause: pure, no receiver."""

from __future__ import annotations

import time

import pytest

from outbox_relay.connectors.sinks.webhook.outcomes import Pause, answer_reason, is_transient, refusal


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (408, True),
        (425, True),
        (429, True),
        (500, True),
        (503, True),
        (400, False),
        (404, False),
        (401, False),
    ],
)
def test_timeouts_throttling_and_server_errors_are_transient(status: int, transient: bool) -> None:
    assert is_transient(status) is transient


def test_a_refusal_of_the_relays_credentials_is_a_setup_failure_not_the_events() -> None:
    for status in (401, 403, 407):
        failure = refusal(status, "no")
        assert failure.setup
        assert failure.transient
        assert not failure.permanent


def test_other_client_errors_refuse_the_event_and_anything_else_is_a_plain_failure() -> None:
    assert refusal(422, "no").permanent
    plain = refusal(302, "moved")
    assert not plain.permanent
    assert not plain.transient
    assert not plain.setup


def test_the_reason_names_the_answer_and_an_excerpt_of_its_body() -> None:
    assert answer_reason("http://h/x", 422, "Unprocessable Entity", " bad field \n") == (
        "webhook http://h/x answered 422 Unprocessable Entity: bad field"
    )
    assert answer_reason("http://h/x", 500, "", "") == "webhook http://h/x answered 500"


def test_a_retry_after_holds_every_request_back_up_to_the_longest_wait_honoured() -> None:
    pause = Pause(longest=30.0)
    assert pause.still_waiting() is None
    assert pause.honour(None) == ""
    assert pause.honour("soon") == ""
    assert pause.still_waiting() is None
    assert pause.honour("120") == " (Retry-After: 120, waiting 30s)"
    waiting = pause.still_waiting()
    assert waiting is not None
    assert waiting.transient
    assert 29.0 < pause.until - time.monotonic() <= 30.0


def test_a_shorter_retry_after_does_not_shorten_a_pause_already_running() -> None:
    pause = Pause(longest=60.0)
    pause.honour("20")
    until = pause.until
    pause.honour("1")
    assert pause.until == until
