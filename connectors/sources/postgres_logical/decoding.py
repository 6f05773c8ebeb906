"""Changes of the replication stream as outbox events: inserted rows in `table` mode, WAL
messages in `message` mode. What cannot be decoded is never skipped: a row or message whose
content is wrong becomes an event with a defect (dead-lettered with its bytes as they came); an
insert into a table the source cannot read raises ConnectorError (the source stops there)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay import json_span
from outbox_relay.connectors.sources import pgoutput, row_events
from outbox_relay.connectors.sources.postgres_connect import ColumnNames
from outbox_relay.connectors.sources.postgres_logical.config import PostgresLogicalConfig
from outbox_relay.connectors.sources.postgres_logical.ledger import Unit
from outbox_relay.connectors.sources.postgres_logical.publication import quoted, shown
from outbox_relay.events import OutboxEvent, member_texts, unencodable
from outbox_relay.identifiers import parse_identifier
from outbox_relay.interfaces import ConnectorError, Unsupported

_JSON_OIDS = {114, 3802}
_BYTEA_OID = 17
_REQUIRED = ("event_id", "aggregate_type", "aggregate_id", "event_type")


@dataclass(frozen=True, slots=True)
class TableShape:
    """Where a published table keeps each field (column indexes in its tuples: event id,
    aggregate type, aggregate id, event type, payload, headers, created_at) and its payload's
    type."""

    indexes: tuple[int, int, int, int, int, int | None, int | None]
    content_type: str
    payload_is_bytea: bool


class ChangeDecoder:
    """Turns the changes of one stream into events. Contract: `describe` each Relation message
    before the inserts that refer to it; `begin` each transaction; `reset` when a new stream
    starts (the server describes every table again)."""

    def __init__(self, config: PostgresLogicalConfig) -> None:
        self._config = config
        self._columns = config.columns.names()
        self._relations: dict[int, TableShape | str | None] = {}
        #: (schema, table), as Relation messages name them, of the tables whose inserts become
        #: events: the configured tables as the server resolved them on start.
        self.tables: set[tuple[str, str]] = set()
        #: Domain type oid -> its base type: a payload column declared as a domain over bytea.
        self.domain_bases: dict[int, tuple[int, str]] = {}
        #: Message mode on a database whose encoding is not UTF8: how its bytes decode (see
        #: `message_charmap`); None when messages are UTF-8 already.
        self.charmap: str | None = None
        #: Commit time of the transaction being read: `created_at` when a row has none.
        self.commit_time = 0.0

    def reset(self) -> None:
        self._relations.clear()

    def begin(self, begin: pgoutput.Begin) -> None:
        self.commit_time = pgoutput.pg_time_to_epoch(begin.commit_time_us)

    def describe(self, relation: pgoutput.Relation) -> None:
        self._relations[relation.relid] = self._shape(relation)

    def insert_event(self, insert: pgoutput.Insert, lsn: int, unit: Unit | None) -> OutboxEvent | None:
        """The event of an inserted row; None for a table message mode does not read."""
        if insert.relid not in self._relations:
            raise ConnectorError(f"an insert into relation {insert.relid} came before its description")
        if unit is None:
            raise ConnectorError("an insert came outside of a transaction")
        shape = self._relations[insert.relid]
        if isinstance(shape, str):  # a table the config does not name
            raise ConnectorError(shape)
        if shape is None:
            return None
        return row_event(insert.values, shape, lsn, self.commit_time, unit)

    def message_event(self, message: pgoutput.Message, lsn: int, unit: Unit) -> OutboxEvent:
        content = message.content
        if self.charmap is not None:
            try:  # the database's encoding, to UTF-8 as the server converts
                content = codecs.charmap_decode(content, "strict", self.charmap)[0].encode()
            except ValueError as exc:
                return _defect_event(lsn, content, self.commit_time, unit, _not_an_event(exc))
        return message_event(content, lsn, self.commit_time, unit)

    def wants(self, message: pgoutput.Message) -> bool:
        """Whether a WAL message is an outbox event (message mode, the configured prefix)."""
        return self._config.mode == "message" and message.prefix == self._config.message_prefix

    def _shape(self, relation: pgoutput.Relation) -> TableShape | str | None:
        """How to read the rows of a published table; None in message mode (tables are not
        read). For a table the config does not name, why its inserts cannot become events: an
        insert into it is an error (skipping it would confirm the slot past it). (Its
        description alone is not: with publish_via_partition_root, PostgreSQL 15 also describes
        a partition whose inserts it sends under the partitioned table's name.)"""
        if self._config.mode != "table":
            return None
        if (relation.namespace, relation.name) not in self.tables:
            configured = ", ".join(sorted(shown(pair) for pair in self.tables))
            return (
                f"publication {quoted(parse_identifier(self._config.publication))} publishes table"
                f" {shown((relation.namespace, relation.name))}, which is not in tables: {configured};"
                " its inserts cannot become events (add it to tables:, or remove it from the publication)"
            )
        return table_shape(relation, self._columns, self.domain_bases)


def table_shape(
    relation: pgoutput.Relation, cols: ColumnNames, domain_bases: dict[int, tuple[int, str]]
) -> TableShape:
    """Where the mapped columns are in the rows of `relation`. Raises ConnectorError when it
    lacks one: every insert of this table would be lost otherwise; fail loudly instead."""
    index = {name: i for i, name in enumerate(relation.columns)}
    wanted = [cols.event_id, cols.aggregate_type, cols.aggregate_id, cols.event_type, cols.payload]
    wanted += [name for name in (cols.headers, cols.created_at) if name is not None]
    missing = [name for name in wanted if name not in index]
    if missing:
        raise ConnectorError(f"table {relation.qualified_name} has no column(s) {', '.join(missing)}")
    payload_oid = relation.type_oids[index[cols.payload]]
    payload_oid = domain_bases.get(payload_oid, (payload_oid, ""))[0]
    return TableShape(
        (
            index[cols.event_id],
            index[cols.aggregate_type],
            index[cols.aggregate_id],
            index[cols.event_type],
            index[cols.payload],
            index[cols.headers] if cols.headers else None,
            index[cols.created_at] if cols.created_at else None,
        ),
        "application/json"
        if payload_oid in _JSON_OIDS
        else ("application/octet-stream" if payload_oid == _BYTEA_OID else "text/plain; charset=utf-8"),
        payload_oid == _BYTEA_OID,
    )


def stand_in_id(lsn: int) -> str:
    """The event id of a change that has none: unique, as the dead-letter table keys on it."""
    return f"lsn-{pgoutput.format_lsn(lsn)}"


def _defect_event(
    lsn: int,
    content: bytes,
    commit_time: float,
    unit: Unit,
    defect: str,
    content_type: str = "application/json",
) -> OutboxEvent:
    """An event for a change that could not be read: its bytes as they came, and why."""
    return OutboxEvent(
        lsn, stand_in_id(lsn), "", None, "", content, {}, commit_time,
        ack_token=unit, content_type=content_type, defect=defect,
    )  # fmt: skip


def row_event(
    values: list[bytes | None], shape: TableShape, lsn: int, commit_time: float, unit: Unit
) -> OutboxEvent:
    """The event of an inserted row: its values (text forms, as pgoutput sends them) decoded,
    then made an event by the rule both PostgreSQL sources share (`row_events`); the commit time
    stands in for a NULL `created_at`. A row whose values cannot be decoded is not skipped but
    becomes a defect (dead-lettered with its payload bytes as they came). (Once per inserted
    row: the fields are decoded here, not through a call each.)"""
    i_id, i_type, i_agg, i_event, i_payload, i_headers, i_created = shape.indexes
    try:
        payload = values[i_payload]
        if payload is not None and shape.payload_is_bytea:
            payload = bytes.fromhex(payload[2:].decode())  # text form of bytea: \x0a1b...
        event_id, aggregate_type = values[i_id], values[i_type]
        aggregate_id, event_type = values[i_agg], values[i_event]
        raw_created = values[i_created] if i_created is not None else None
        created: float | None = None
        if raw_created is not None:  # its text as seconds since the epoch; 'infinity' or a year
            try:  # past 9999 as infinite, which the row rule (`checked_time`) then refuses
                created = pgoutput.timestamptz_text_to_epoch(raw_created.decode())
            except ValueError:
                created = float("inf")
        fields: row_events.RowFields = (
            lsn,
            None if event_id is None else event_id.decode(),
            None if aggregate_type is None else aggregate_type.decode(),
            None if aggregate_id is None else aggregate_id.decode(),
            None if event_type is None else event_type.decode(),
            payload,
            values[i_headers] if i_headers is not None else None,
            created,
        )
        return row_events.row_as_event(fields, commit_time, stand_in_id, shape.content_type, unit)
    except (ValueError, TypeError, IndexError) as exc:  # (UnicodeDecodeError is a ValueError)
        raw = values[i_payload] if len(values) > i_payload else None
        reason = f"cannot decode the row: {exc}"
        return _defect_event(lsn, bytes(raw or b""), commit_time, unit, reason, "application/octet-stream")


def _not_an_event(exc: ValueError) -> str:
    return f"message is not an outbox event JSON object: {exc}"


def message_event(content: bytes, lsn: int, commit_time: float, unit: Unit) -> OutboxEvent:
    """The event of a WAL message's content (UTF-8 JSON, see `relay.outbox.emit_event`). Its
    fields, header values and payload are taken as written: a numeric aggregate id keeps its
    digits, the payload its bytes, never re-encoded."""
    try:
        body = json_span.parse(content)
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        span = json_span.member_spans(content, ("payload",)).get("payload")
    except ValueError as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return _defect_event(lsn, content, commit_time, unit, _not_an_event(exc))
    missing = [name for name in _REQUIRED if body.get(name) in (None, "")]
    defect = f"message lacks {missing[0]}" if missing else None
    fields = member_texts(content, {k: v for k, v in body.items() if k != "payload" and v is not None})
    headers: dict[str, str] = {}
    if isinstance(body.get("headers"), dict):
        start, end = json_span.member_spans(content, ("headers",))["headers"]
        headers = member_texts(content[start:end], body["headers"])
    elif body.get("headers") not in (None, {}):
        defect = defect or "headers must be a JSON object"
    defect = defect or unencodable([*(fields.get(k, "") for k in _REQUIRED), *headers, *headers.values()])
    return OutboxEvent(
        lsn,
        fields.get("event_id") or stand_in_id(lsn),
        fields.get("aggregate_type", ""),
        fields.get("aggregate_id"),
        fields.get("event_type", ""),
        b"null" if span is None else content[span[0] : span[1]],
        headers if defect is None else {},
        commit_time,
        ack_token=unit,
        defect=defect,
    )


async def message_charmap(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """How to read WAL messages of this database as UTF-8: None when its encoding is UTF8, else
    a decoding table for `codecs.charmap_decode`.

    pgoutput sends a message's content as the raw bytes of the database's encoding (everything
    else it sends is converted to the client encoding, UTF8). For a single-byte encoding (LATIN1,
    WIN1252, KOI8R, ...) the table is the server's own conversion of each byte, asked once, so
    messages read exactly as a `text` column would; a byte the server cannot convert stays
    undefined (such a message becomes a defect and is dead-lettered, never altered). Multi-byte
    encodings other than UTF8 (EUC_JP, EUC_CN, ...) have no such table: message mode refuses
    them (table mode converts everything on the server and works with any encoding)."""
    encoding = conn.info.parameter_status("server_encoding") or "UTF8"
    if encoding == "UTF8":
        return None
    row = await (
        await conn.execute("SELECT pg_encoding_max_length(pg_char_to_encoding(%s))", (encoding,))
    ).fetchone()
    if not row or row[0] != 1:
        raise Unsupported(
            f"message mode cannot read WAL messages of database {conn.info.dbname}: its encoding"
            f" {encoding} is neither UTF8 nor a single-byte encoding, and PostgreSQL sends messages"
            " unconverted; use mode: table, or a database in UTF8"
        )
    table = [chr(byte) for byte in range(128)] + ["\ufffe"] * 128  # U+FFFE: undefined
    convert = "SELECT convert_from(decode(lpad(to_hex(%s::int), 2, '0'), 'hex'), %s)"
    for byte in range(128, 256):
        try:
            converted = await (await conn.execute(convert, (byte, encoding))).fetchone()
        except psycopg.DataError:  # no equivalent in UTF-8
            continue
        if converted and len(converted[0]) == 1:
            table[byte] = converted[0]
    return "".join(table)
