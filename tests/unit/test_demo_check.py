"""The demo's proof: what the sink received, held against what was written. Lost events,
gaps and reorders within an order fail it; duplicates are counted and allowed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from outbox_relay.connectors.sinks.file import JsonLinesTail
from outbox_relay.tools.demo_check import SinkTally, summarize
from outbox_relay.tools.demo_orders import LIFECYCLE, OrderBook, Written


def _line(event_id: str, order_id: str, sequence: int, run: str = "r1") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "aggregate_id": order_id,
        "event_type": LIFECYCLE[sequence - 1],
        "headers": {"demo_run": run},
        "payload": {"sequence": sequence},
    }


def _written(*events: tuple[str, str, int]) -> Written:
    written = Written("r1")
    written.events = {event_id: (order, sequence) for event_id, order, sequence in events}
    return written


_TWO_ORDERS = (("a1", "a", 1), ("b1", "b", 1), ("a2", "a", 2), ("b2", "b", 2))


def test_everything_received_in_each_orders_lifecycle_order_passes() -> None:
    tally = SinkTally("r1")
    tally.add([_line(e, o, s) for e, o, s in _TWO_ORDERS])
    summary = summarize(_written(*_TWO_ORDERS), tally, 1.0)
    assert (summary.written, summary.published, summary.lost, summary.violations) == (4, 4, 0, 0)
    assert summary.passed


def test_an_event_never_received_is_lost_and_leaves_a_gap_in_its_order() -> None:
    tally = SinkTally("r1")
    tally.add([_line(e, o, s) for e, o, s in _TWO_ORDERS if e != "a1"])
    summary = summarize(_written(*_TWO_ORDERS), tally, 1.0)
    assert summary.lost == 1
    assert summary.violations == 1, "order a starts at step 2"
    assert not summary.passed
    assert "FAILED" in summary.as_text()


def test_an_order_whose_steps_arrive_swapped_is_a_violation_though_nothing_is_lost() -> None:
    tally = SinkTally("r1")
    tally.add([_line("a2", "a", 2), _line("a1", "a", 1)])
    summary = summarize(_written(("a1", "a", 1), ("a2", "a", 2)), tally, 1.0)
    assert summary.lost == 0
    assert summary.violations >= 1
    assert not summary.passed


def test_repeats_are_counted_as_duplicates_and_do_not_fail_the_demo() -> None:
    tally = SinkTally("r1")
    lines = [_line("a1", "a", 1), _line("a2", "a", 2), _line("a1", "a", 1), _line("a2", "a", 2)]
    new = tally.add(lines)
    summary = summarize(_written(("a1", "a", 1), ("a2", "a", 2)), tally, 1.0)
    assert [line["event_id"] for line in new] == ["a1", "a2"]
    assert (summary.duplicates, summary.violations, summary.lost) == (2, 0, 0)
    assert summary.passed
    assert "at-least-once" in summary.as_text()


def test_lines_of_another_run_in_the_same_outbox_are_not_counted() -> None:
    tally = SinkTally("r1")
    tally.add([_line("x1", "x", 3, run="older"), _line("a1", "a", 1)])
    assert set(tally.received) == {"a1"}
    assert tally.violations == 0


def test_the_file_tail_returns_each_complete_line_once_and_waits_for_the_rest_of_a_torn_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    tail = JsonLinesTail(str(path))
    assert tail.read() == [], "no file yet"
    first, second = orjson.dumps(_line("a1", "a", 1)), orjson.dumps(_line("a2", "a", 2))
    path.write_bytes(first + b"\n" + second[:10])
    assert [line["event_id"] for line in tail.read()] == ["a1"]
    with path.open("ab") as handle:
        handle.write(second[10:] + b"\n")
    assert [line["event_id"] for line in tail.read()] == ["a2"]
    assert tail.read() == []


def test_the_order_book_interleaves_orders_and_moves_each_through_its_lifecycle_in_turn() -> None:
    book = OrderBook("r1", open_orders=5, seed=7)
    steps: dict[str, list[int]] = {}
    moved = []
    for _ in range(400):
        order_id, sequence = book.next_step()
        steps.setdefault(order_id, []).append(sequence)
        moved.append(order_id)
    for order_id, sequences in steps.items():
        assert sequences == list(range(1, len(sequences) + 1)), order_id
        assert len(sequences) <= len(LIFECYCLE)
    assert sum(len(s) == len(LIFECYCLE) for s in steps.values()) > 50, "orders complete and new ones open"
    first = [index for index, order_id in enumerate(moved) if order_id == moved[0]]
    assert set(moved[first[0] : first[-1]]) - {moved[0]}, "other orders move between its steps"
