"""A decoder for PostgreSQL's `pgoutput` logical replication messages (protocol version 1) and
the streaming-replication frames around them.

Pure functions over bytes, no I/O: the source feeds it what `get_copy_data` returns. Only what
an outbox needs is decoded (Begin, Commit, Relation, Insert, Message); Update, Delete, Truncate,
Type and Origin are recognised and skipped. Formats: PostgreSQL documentation, chapter
"Logical Replication Message Formats" and "Streaming Replication Protocol".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime

# Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_OFFSET_US = 946_684_800_000_000

_XLOG_HEADER = struct.Struct("!QQq")  # dataStart, walEnd, sendTime after the 'w'
_KEEPALIVE = struct.Struct("!QqB")  # walEnd, sendTime, replyRequested after the 'k'
_BEGIN = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp
_STATUS = struct.Struct("!cQQQqB")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")

#: Marks a TOASTed value that did not change (only in updates; inserts always carry values).
UNCHANGED = object()


@dataclass(frozen=True, slots=True)
class XLogData:
    wal_start: int
    wal_end: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    reply_requested: bool


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    end_lsn: int
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    namespace: str
    name: str
    columns: tuple[str, ...]
    type_oids: tuple[int, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"


@dataclass(frozen=True, slots=True)
class Insert:
    relid: int
    values: list[bytes | None]


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


Decoded = Begin | Commit | Relation | Insert | Message | None


def parse_frame(frame: bytes) -> XLogData | Keepalive | None:
    """One CopyData frame of the replication stream; None for frames we do not use."""
    kind = frame[:1]
    if kind == b"w":
        start, end, _ = _XLOG_HEADER.unpack_from(frame, 1)
        return XLogData(start, end, frame[25:])
    if kind == b"k":
        end, _, reply = _KEEPALIVE.unpack_from(frame, 1)
        return Keepalive(end, bool(reply))
    return None


def standby_status(received: int, flushed: int, now_us: int, reply: bool = False) -> bytes:
    """The Standby Status Update: write position `received`, flush and apply position `flushed`."""
    return _STATUS.pack(b"r", received, flushed, flushed, now_us - PG_EPOCH_OFFSET_US, int(reply))


def decode(payload: bytes) -> Decoded:
    """Decode one pgoutput message; None for the kinds an outbox ignores."""
    kind = payload[0]
    if kind == 0x49:  # 'I'
        relid = _U32.unpack_from(payload, 1)[0]
        # payload[5] is 'N' (new tuple)
        return Insert(relid, _tuple_values(payload, 6))
    if kind == 0x42:  # 'B'
        final_lsn, ts, xid = _BEGIN.unpack_from(payload, 1)
        return Begin(final_lsn, ts, xid)
    if kind == 0x43:  # 'C'
        _, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(payload, 1)
        return Commit(commit_lsn, end_lsn, ts)
    if kind == 0x52:  # 'R'
        return _relation(payload)
    if kind == 0x4D:  # 'M'
        flags = payload[1]
        lsn = _U64.unpack_from(payload, 2)[0]
        prefix, offset = _cstring(payload, 10)
        length = _U32.unpack_from(payload, offset)[0]
        start = offset + 4
        return Message(bool(flags & 1), lsn, prefix, payload[start : start + length])
    return None


def _cstring(buf: bytes, offset: int) -> tuple[str, int]:
    end = buf.index(b"\0", offset)
    return buf[offset:end].decode(), end + 1


def _relation(payload: bytes) -> Relation:
    relid = _U32.unpack_from(payload, 1)[0]
    namespace, offset = _cstring(payload, 5)
    name, offset = _cstring(payload, offset)
    offset += 1  # replica identity setting
    count = _U16.unpack_from(payload, offset)[0]
    offset += 2
    columns: list[str] = []
    oids: list[int] = []
    for _ in range(count):
        offset += 1  # flags (part of the key)
        column, offset = _cstring(payload, offset)
        oids.append(_U32.unpack_from(payload, offset)[0])
        offset += 8  # type oid, type modifier
        columns.append(column)
    # An empty namespace means pg_catalog.
    return Relation(relid, namespace or "pg_catalog", name, tuple(columns), tuple(oids))


def _tuple_values(buf: bytes, offset: int) -> list[bytes | None]:
    count = _U16.unpack_from(buf, offset)[0]
    offset += 2
    # Filled in place (a NULL is left as it is): no list method called per column of every row.
    values: list[bytes | None] = [None] * count
    unpack_length = _I32.unpack_from
    for index in range(count):
        kind = buf[offset]
        offset += 1
        if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
            length = unpack_length(buf, offset)[0]
            offset += 4
            values[index] = buf[offset : offset + length]
            offset += length
        elif kind != 0x6E:  # (not 'n', null) 'u', unchanged TOAST: never in an insert
            values[index] = UNCHANGED  # type: ignore[call-overload]
    return values


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def pg_time_to_epoch(us_since_2000: int) -> float:
    return (us_since_2000 + PG_EPOCH_OFFSET_US) / 1_000_000


def timestamptz_text_to_epoch(text: str) -> float:
    """PostgreSQL's text output of timestamptz (ISO DateStyle) as seconds since the epoch."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()
