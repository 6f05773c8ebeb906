"""Dead letters end to end: a real PostgreSQL, the pipeline, and sinks that refuse events the way
a broker does (the Kafka case uses the real broker and an event larger than it accepts)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client import REGISTRY

from outbox_relay.events import Failure, OutboxEvent, PublishResult
from outbox_relay.interfaces import Sink, SinkFeatures
from outbox_relay.outbox import write_event
from tests.conftest import run_cli
from tests.harness.kafka import KafkaBroker
from tests.support import (
    dead_letters,
    insert_events,
    pipeline_with_sink,
    read_lines,
    relay_config,
    run_relay_until,
    set_up_outbox_database,
    unpublished,
    write_config,
)


class _Refuses(Sink):
    """Refuses every attempt at events whose payload carries `"poison": true`, the way a broker
    refuses a message it will never take; delivers the rest (recording what it delivered)."""

    kind = "test"

    def __init__(
        self, *, permanent: bool = False, transient: bool = False, keeps_order: bool = False
    ) -> None:
        self.permanent, self.transient = permanent, transient
        self.features = SinkFeatures(keeps_order=keeps_order)
        self.delivered: list[OutboxEvent] = []
        self.refusals = 0
        self.log: list[tuple[str, str]] = []  # ("refused" | "delivered", event_id), in call order

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results: list[PublishResult] = []
        for event in events:
            if b'"poison": true' in event.payload:
                self.refusals += 1
                self.log.append(("refused", event.event_id))
                results.append(Failure("refused: poison", permanent=self.permanent, transient=self.transient))
            else:
                self.delivered.append(event)
                self.log.append(("delivered", event.event_id))
                results.append(None)
        return results


def _sample(name: str) -> float | None:
    """A metric of this process's registry, for the outbox the tests use."""
    return REGISTRY.get_sample_value(name, {"outbox": "orders"})


def _write_poison_between(dsn: str) -> str:
    """order-1 gets: a normal event, the poison event, then three more; other aggregates flow."""
    insert_events(dsn, 300, aggregates=3)
    with psycopg.connect(dsn, autocommit=True) as conn:
        poison = write_event(conn, "order", "order-1", "Poison", {"poison": True})
        for i in range(3):
            write_event(conn, "order", "order-1", "After", {"after": i})
    return poison


async def test_poison_event_is_dead_lettered_after_n_refusals_while_other_aggregates_flow(dsn: str) -> None:
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 3}
    config["outboxes"][0]["pipeline"] = {"stats_interval": "100ms"}
    sink = _Refuses()
    parked_before = _sample("outbox_relay_dead_lettered_total") or 0.0
    retries_before = _sample("outbox_relay_retries_total") or 0.0

    def drained_and_counted(_: Any) -> bool:
        return unpublished(dsn) == 0 and _sample("outbox_relay_dead_letters") == 1.0

    await run_relay_until(config, drained_and_counted, pipelines=[pipeline_with_sink(config, sink)])
    assert _sample("outbox_relay_dead_lettered_total") == parked_before + 1
    assert sink.refusals == 3
    assert _sample("outbox_relay_retries_total") == retries_before + 2, "the third refusal parks it"
    (letter,) = await dead_letters(dsn)
    assert (letter.event_id, letter.attempts, letter.error, letter.permanent) == (
        poison,
        3,
        "refused: poison",
        False,
    )
    assert letter.first_failed_at <= letter.last_failed_at
    assert letter.payload == b'{"poison": true}'
    order_1 = [e.event_type for e in sink.delivered if e.aggregate_id == "order-1"]
    assert order_1[-3:] == ["After", "After", "After"], "its aggregate moved on after parking, in order"
    assert len(sink.delivered) == 303


async def test_events_sent_in_one_call_behind_a_refused_event_are_published_again_after_it(dsn: str) -> None:
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 2}
    sink = _Refuses(keeps_order=True)  # so a call carries several events of order-1
    pipeline = pipeline_with_sink(config, sink)
    assert pipeline.per_aggregate_depth > 1

    def drained_and_parked(_: Any) -> bool:
        return unpublished(dsn) == 0

    await run_relay_until(config, drained_and_parked, pipelines=[pipeline])
    assert [letter.event_id for letter in await dead_letters(dsn)] == [poison]
    after = [e.event_id for e in sink.delivered if e.event_type == "After"]
    assert len(after) > 3, "the events behind the poison went out in the same call as it"
    assert len(after) <= 6, "once only ahead of it: its retry went out alone"
    last_refusal = max(i for i, (what, _) in enumerate(sink.log) if what == "refused")
    last_delivery = {event_id: i for i, (what, event_id) in enumerate(sink.log) if what == "delivered"}
    final_order = sorted(dict.fromkeys(after), key=last_delivery.__getitem__)
    assert final_order == list(dict.fromkeys(after)), "their last copies are in outbox order"
    assert all(last_delivery[event_id] > last_refusal for event_id in final_order)


async def test_block_keeps_the_poison_aggregate_stopped_while_the_others_flow(dsn: str) -> None:
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 2, "on_poison": "block"}
    # Even a sink that could take several events of an aggregate per call gets one at a time:
    # a later event must never be sent while an earlier one is being refused.
    sink = _Refuses(keeps_order=True)

    def others_done_and_poison_retried(_: Any) -> bool:
        return len(sink.delivered) == 300 and sink.refusals >= 5

    await run_relay_until(
        config, others_done_and_poison_retried, pipelines=[pipeline_with_sink(config, sink)]
    )
    assert "After" not in {e.event_type for e in sink.delivered}
    # The poison event and everything after it of its aggregate wait in the dead-letter table,
    # held in order; the outbox is drained.
    held = await dead_letters(dsn)
    assert [(letter.event_type, letter.state) for letter in held] == [("Poison", "held")] + [
        ("After", "held")
    ] * 3
    assert held[0].event_id == poison
    assert held[0].attempts >= 5
    assert unpublished(dsn) == 0


async def test_an_outage_never_dead_letters_anything(dsn: str) -> None:
    _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 2}
    sink = _Refuses(transient=True)  # "the broker did not answer" for the poison event, many times
    await run_relay_until(config, lambda _: sink.refusals >= 6, pipelines=[pipeline_with_sink(config, sink)])
    assert await dead_letters(dsn) == []


async def test_an_event_larger_than_kafka_accepts_is_dead_lettered_at_once(
    dsn: str, kafka: KafkaBroker
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        huge = write_event(conn, "order", "big", "Huge", {"blob": "x" * 200_000})
        small = write_event(conn, "order", "big", "Small", {"n": 1})
    sink = {
        "type": "kafka",
        "bootstrap_servers": kafka.bootstrap_servers,
        "topic": "dlq-test.{aggregate_type}",
        "producer": {"message.max.bytes": 100_000},
    }
    config = relay_config(dsn, sink)
    await run_relay_until(config, lambda _: unpublished(dsn) == 0, timeout=60)
    (letter,) = await dead_letters(dsn)
    assert letter.event_id == huge
    assert letter.permanent
    assert letter.attempts == 1
    assert "dlq-test.order" in letter.error
    assert "MSG_SIZE_TOO_LARGE" in letter.error
    delivered = kafka.consume_all("dlq-test.order", 1, timeout=10)
    # `small` may have gone out in the same call as `huge`; it is then published again once
    # `huge` is parked (at-least-once), and nothing else of the aggregate ever reaches the topic.
    assert {dict(m["headers"])["event_id"] for m in delivered} == {small.encode()}


async def test_replay_puts_a_dead_letter_back_once_and_the_cli_lists_shows_and_purges(
    dsn: str, tmp_path: Path
) -> None:
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 1}
    await run_relay_until(
        config, lambda _: unpublished(dsn) == 0, pipelines=[pipeline_with_sink(config, _Refuses())]
    )
    out = tmp_path / "out.jsonl"
    config["outboxes"][0]["sink"] = {"type": "file", "path": str(out)}
    path = write_config(tmp_path, config)

    listed = run_cli("dlq", "list", "-c", str(path))
    assert listed.returncode == 0, listed.stderr
    assert f"orders {poison} order/order-1 Poison state=dead attempts=1" in listed.stdout
    shown = run_cli("dlq", "show", "-c", str(path), "--event-id", poison)
    assert '"payload": "{\\"poison\\": true}"' in shown.stdout

    replayed = run_cli("dlq", "replay", "-c", str(path), "--event-id", poison)
    assert replayed.returncode == 0, replayed.stderr
    assert f"orders {poison}: unmarked row" in replayed.stdout
    again = run_cli("dlq", "replay", "-c", str(path), "--event-id", poison)
    assert again.returncode == 0, "a replay happens once"
    assert "not replayed again" in again.stdout, "a replay happens once"
    drained = run_cli("run", "-c", str(path), "--drain")
    assert drained.returncode == 0, drained.stderr
    assert [line["event_id"] for line in read_lines(out)] == [poison]

    assert "replayed=" in run_cli("dlq", "list", "-c", str(path), "--all").stdout
    assert run_cli("dlq", "list", "-c", str(path)).stdout == ""
    purged = run_cli("dlq", "purge", "-c", str(path), "--replayed")
    assert purged.stdout.strip() == "orders: 1 dead letters purged"


async def test_rows_missing_required_columns_are_each_dead_lettered_with_the_reason(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE loose (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, eid uuid,"
            " kind text, agg text, ev text, body jsonb, done_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO loose (eid, kind, agg, ev, body) VALUES"
            " (gen_random_uuid(), 'order', 'a', 'E', '{\"n\": 1}'),"
            " (NULL, 'order', 'a', 'E', '{\"n\": 2}'),"  # two rows without an event id: two letters
            " (NULL, 'order', 'b', 'E', '{\"n\": 3}'),"
            " (gen_random_uuid(), NULL, 'c', 'E', '{\"n\": 4}'),"
            " (gen_random_uuid(), 'order', 'd', NULL, '{\"n\": 5}')"
        )
    columns = {"position": "id", "event_id": "eid", "aggregate_type": "kind", "aggregate_id": "agg",
               "event_type": "ev", "payload": "body", "headers": None, "created_at": None,
               "published_at": "done_at"}  # fmt: skip
    config = relay_config(dsn, {"type": "stdout"}, table="public.loose", columns=columns, notify=False)
    sink = _Refuses()

    def all_settled(_: Any) -> bool:
        with psycopg.connect(dsn) as conn:
            return conn.execute("SELECT count(*) FROM loose WHERE done_at IS NULL").fetchone() == (0,)

    await run_relay_until(config, all_settled, pipelines=[pipeline_with_sink(config, sink)])
    letters = {bytes(letter.payload): letter for letter in await dead_letters(dsn)}
    assert sorted(letters) == [b'{"n": 2}', b'{"n": 3}', b'{"n": 4}', b'{"n": 5}']
    assert [letters[b'{"n": 2}'].error, letters[b'{"n": 3}'].error] == ["event id is NULL"] * 2
    assert letters[b'{"n": 4}'].error == "aggregate type is NULL"
    assert letters[b'{"n": 5}'].error == "event type is NULL"
    assert all(letter.permanent and letter.attempts == 1 for letter in letters.values())
    assert [e.payload for e in sink.delivered] == [b'{"n": 1}']


async def test_a_poison_event_waits_unacknowledged_while_the_dead_letter_table_is_missing(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE outbox_relay_dead_letters")
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    sink = _Refuses(permanent=True)  # parked at its first refusal, if the table were there
    held_since: float | None = None

    def recreate_the_table_once_the_rest_is_through(_: Any) -> bool:
        nonlocal held_since
        left = unpublished(dsn)
        if held_since is None and left == 4:  # the poison and the three events behind it
            held_since = time.monotonic()
        if held_since is not None and time.monotonic() - held_since > 1.0 and left == 4:
            set_up_outbox_database(dsn)  # what init-db runs
            held_since = float("inf")  # (done once)
        return left == 0

    pipeline = pipeline_with_sink(config, sink)
    await run_relay_until(config, recreate_the_table_once_the_rest_is_through, pipelines=[pipeline])
    assert held_since == float("inf"), "the poison event stayed unacknowledged until the table was back"
    assert [letter.event_id for letter in await dead_letters(dsn)] == [poison]
    order_1 = [e.event_type for e in sink.delivered if e.aggregate_id == "order-1"]
    assert order_1[-3:] == ["After", "After", "After"]


async def test_the_events_behind_a_defective_row_are_not_sent_ahead_of_it_in_the_same_call(
    dsn: str, tmp_path: Path
) -> None:
    """A row with headers that are not a JSON object is a defect: it is dead-lettered, never
    sent; the later events of its aggregate, which an order-keeping sink gets in the same call,
    must not reach the broker before that (they would arrive twice, once ahead of it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [write_event(conn, "order", "x", "E", {"n": n}) for n in (1, 2, 3)]
        conn.execute("UPDATE outbox SET headers = '[1]' WHERE event_id = %s", (ids[1],))
    out = tmp_path / "out.jsonl"
    config = relay_config(dsn, {"type": "file", "path": str(out)})
    await run_relay_until(config, lambda _: unpublished(dsn) == 0)
    assert [line["event_id"] for line in read_lines(out)] == [ids[0], ids[2]]
    assert [letter.event_id for letter in await dead_letters(dsn)] == [ids[1]]


class _FailsThenRefuses(_Refuses):
    """For the poison event: the broker is unreachable for the first `outage` tries, then refuses."""

    def __init__(self, outage: int) -> None:
        super().__init__()
        self.outage = outage

    async def publish(self, events: Sequence[OutboxEvent]) -> list[PublishResult]:
        results = await super().publish(events)
        for index, result in enumerate(results):
            if result is not None and self.outage > 0:
                self.outage -= 1
                results[index] = Failure("broker unreachable", transient=True)
        return results


async def test_dlq_list_names_every_try_and_the_refusals_that_after_attempts_counts(
    dsn: str, tmp_path: Path
) -> None:
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 2}
    config["outboxes"][0]["retry"] = {"initial": "10ms", "max": "20ms"}
    sink = _FailsThenRefuses(outage=3)
    await run_relay_until(
        config, lambda _: unpublished(dsn) == 0, pipelines=[pipeline_with_sink(config, sink)]
    )
    [letter] = await dead_letters(dsn)
    assert (letter.event_id, letter.attempts, letter.refusals) == (poison, 5, 2)
    path = write_config(tmp_path, config)
    listed = run_cli("dlq", "list", "-c", str(path))
    assert "state=dead attempts=5 refusals=2/2 " in listed.stdout, listed.stdout
    shown = run_cli("dlq", "show", "-c", str(path), "--event-id", poison)
    assert '"attempts": 5' in shown.stdout, shown.stdout
    assert '"refusals": 2' in shown.stdout, shown.stdout


async def test_dlq_show_replay_and_purge_say_no_such_event_for_an_unknown_id_and_exit_1(
    dsn: str, tmp_path: Path
) -> None:
    poison = _write_poison_between(dsn)
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"after_attempts": 1}
    await run_relay_until(
        config, lambda _: unpublished(dsn) == 0, pipelines=[pipeline_with_sink(config, _Refuses())]
    )
    path = write_config(tmp_path, config)
    for command in ("show", "replay", "purge"):
        result = run_cli("dlq", command, "-c", str(path), "--event-id", poison, "--event-id", "no-such-id")
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert result.stderr.splitlines()[-1] == "no such event in any dead-letter table: no-such-id"
        assert "Traceback" not in result.stderr
        done = {"show": poison, "replay": f"orders {poison}: unmarked row", "purge": "1 dead letters purged"}
        assert done[command] in result.stdout, "the events that exist are still shown, replayed or purged"
    result = run_cli("dlq", "show", "-c", str(path), "--outbox", "orders", "--event-id", poison)
    assert result.returncode == 1, "purged: gone"
    assert result.stderr.strip() == f"no such event in outbox orders's dead-letter table: {poison}"


def test_init_db_makes_the_table_dlq_list_reads_for_a_block_config(dsn: str, tmp_path: Path) -> None:
    config = relay_config(dsn, {"type": "stdout"})
    config["outboxes"][0]["dead_letter"] = {"on_poison": "block", "table": "app_held"}
    path = write_config(tmp_path, config)
    assert run_cli("init-db", "-c", str(path)).returncode == 0
    listed = run_cli("dlq", "list", "-c", str(path))
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "")
