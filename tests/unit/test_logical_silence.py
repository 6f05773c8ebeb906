"""When a silent replication stream calls for a reply, and when it is dead (the rule of
PostgreSQL's wal_receiver_timeout)."""

from __future__ import annotations

from outbox_relay.connectors.sources.postgres_logical.silence import Due, Silence


def test_a_stream_silent_for_half_the_timeout_asks_for_a_reply_once_and_is_dead_at_the_whole() -> None:
    silence = Silence(10.0, now=100.0)
    assert silence.due(104.9) is Due.NOTHING
    assert silence.until_due(104.0) == 1.0
    assert silence.due(105.0) is Due.ASK
    silence.asked(105.0)
    assert silence.due(109.9) is Due.NOTHING
    assert silence.until_due(106.0) == 4.0
    assert silence.due(110.0) is Due.DEAD
    assert silence.silent_for(110.0) == 10.0


def test_a_frame_from_the_server_starts_the_silence_over_and_forgets_the_question() -> None:
    silence = Silence(10.0, now=0.0)
    silence.asked(5.0)
    silence.heard(8.0)
    assert silence.due(12.9) is Due.NOTHING
    assert silence.due(13.0) is Due.ASK


def test_a_stream_not_read_for_longer_than_the_timeout_is_asked_first_not_given_up_on() -> None:
    # (A relay whose window was full read nothing meanwhile: the server gets half the timeout
    # to answer the question before the stream counts as dead.)
    silence = Silence(10.0, now=0.0)
    assert silence.due(70.0) is Due.ASK
    silence.asked(70.0)
    assert silence.due(74.9) is Due.NOTHING
    assert silence.until_due(70.0) == 5.0
    assert silence.due(75.0) is Due.DEAD


def test_a_timeout_of_zero_never_asks_and_never_gives_up() -> None:
    silence = Silence(0.0, now=0.0)
    assert silence.due(1e9) is Due.NOTHING
    assert silence.until_due(1e9) == float("inf")
