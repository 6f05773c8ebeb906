"""The SQL the polling source builds from the inspected table: names are identifiers, values are
parameters, a fenced ack checks the lease token in the same statement. Pure, no database."""

from __future__ import annotations

from dataclasses import dataclass

from outbox_relay.connectors.sources.outbox_table import ResolvedTable
from outbox_relay.connectors.sources.postgres_polling.config import ColumnMapping
from outbox_relay.connectors.sources.postgres_polling.queries import build_queries

_TABLE = ResolvedTable(oid=1, schema="app", name="Out box", kind="r")


@dataclass
class _Fence:
    table: str = "relay.leases"
    key: str = "k"
    token: int = 3

    def valid(self) -> bool:
        return True


def _text(marks: bool = True, fence: _Fence | None = None, payload_is_bytes: bool = False) -> dict[str, str]:
    built = build_queries(
        _TABLE, ColumnMapping().names(), marks=marks, payload_is_bytes=payload_is_bytes, fence=fence
    )
    return {name: query.as_string(None) for name, query in built.items()}


def test_every_query_is_built_and_names_the_table_quoted() -> None:
    queries = _text()
    assert sorted(queries) == ["ack", "backlog", "read", "read_gaps", "sweep"]
    assert all('"app"."Out box"' in text for text in queries.values())


def test_marking_sets_published_at_and_reads_only_unpublished_rows() -> None:
    queries = _text(marks=True)
    assert queries["ack"].startswith('UPDATE "app"."Out box" SET "published_at" = now()')
    assert '"published_at" IS NULL' in queries["read"]


def test_deleting_reads_every_row_and_deletes_by_position() -> None:
    queries = _text(marks=False)
    assert queries["ack"] == 'DELETE FROM "app"."Out box" WHERE "position" = ANY(%s)'
    assert "IS NULL" not in queries["read"]


def test_a_fenced_ack_marks_only_while_the_lease_token_is_this_relays() -> None:
    ack = _text(fence=_Fence())["ack"]
    assert ack.startswith('WITH fence AS (SELECT FROM "relay"."leases" WHERE lease = %s AND token = %s)')
    assert "AND EXISTS (SELECT FROM fence)" in ack


def test_the_sweep_skips_held_positions_and_a_text_payload_is_cast() -> None:
    queries = _text()
    assert 'NOT ("position" = ANY(%s::int8[]))' in queries["sweep"]
    assert '"payload"::text' in queries["read"]
    assert '"payload"::text' not in _text(payload_is_bytes=True)["read"]
