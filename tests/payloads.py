"""Payloads that a re-encoding anywhere on the way would change: the relay must deliver each
byte for byte (docs/concepts/payloads.md: "the message body is the payload as stored; numbers
never pass through a float")."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from outbox_relay.json_span import member_spans

# JSON documents as an application might write them into a `json` column or a message.
NUMBERS = (
    b'{"a":123456789012345678901234567890,"price":1.10,"n":1e2,"m":1E+2,"z":-0,"f":-0.0,'
    b'"e":1.5e-10,"huge":1E400,"neg":-12345678901234567890.000}'
)
TEXT_ESCAPES = (
    b'{"s":"caf\\u00e9 caf\xc3\xa9 \\u0000 \\ud83d\\ude00 \xf0\x9f\x98\x80 \\"q\\" \\\\ \\/ \\t",'
    b'"k\\u0065y":"\\u2028\xe2\x80\xa8\\r\\n","\xe6\x97\xa5\xe6\x9c\xac":"\xe8\xaa\x9e"}'
)
LINE_BREAKS = b'{\r\n  "a": 1.50,\n  "b": [1,\n    2.0],\r\n\t"c": "x y"\n}\n'
NOT_AN_OBJECT = b"[1.0, 2.50e0, -0, null, true]"
A_STRING = b'"just text, caf\\u00e9"'
# 5 MB: a big string with escapes and multi-byte characters, and a number after it.
BIG = b'{"blob":"' + b'x\\"\xc3\xa9\\u00e9y' * 440_000 + b'","n":1.000}'

JSON_PAYLOADS: dict[str, bytes] = {
    "numbers": NUMBERS,
    "text-escapes": TEXT_ESCAPES,
    "line-breaks": LINE_BREAKS,
    "not-an-object": NOT_AN_OBJECT,
    "a-string": A_STRING,
    "5MB": BIG,
}

# What a `jsonb` column holds can differ from what was written (PostgreSQL renders jsonb its own
# way, and jsonb refuses \u0000): the payloads for jsonb columns, delivered as PostgreSQL renders them.
JSONB_PAYLOADS: dict[str, bytes] = {
    name: payload for name, payload in JSON_PAYLOADS.items() if b"\\u0000" not in payload
}

# A `text` column: any text, line breaks and quotes included.
TEXT_PAYLOAD = 'line one\r\nline "two" caf\u00e9 \u65e5\u672c {"not": json} \\ end'.encode()
# A `bytea` column: any bytes.
BYTES_PAYLOAD = bytes(range(256)) + b"\\x00 \x00\xff\xfe"


def in_a_line(payload: bytes) -> bytes:
    """A JSON payload as the line-based formats (file, stdout, webhook batch) carry it: the raw
    line breaks JSON allows between tokens become spaces, nothing else changes."""
    return payload.replace(b"\r", b" ").replace(b"\n", b" ")


def read_line(line: bytes) -> tuple[str, bytes]:
    """(event id, payload) of one line of the JSON-lines format (file and stdout sinks, a webhook
    batch element). For `payload`, the exact bytes between its colon and the line's closing
    brace (it is the last member), so whitespace around the value counts too: a JSON payload as
    embedded, text as the JSON string it is embedded as. For `payload_base64`, the bytes."""
    spans = member_spans(line, ["event_id", "payload", "payload_base64"])
    event_id = json.loads(line[slice(*spans["event_id"])])
    if "payload_base64" in spans:
        return event_id, base64.b64decode(json.loads(line[slice(*spans["payload_base64"])]))
    start, end = spans["payload"]
    while line[start - 1 : start] in (b" ", b"\t"):
        start -= 1
    assert line[start - 10 : start] == b'"payload":', line[:200]
    assert line.endswith(b"}"), line[:200]
    assert not line[end:-1].strip(b" \t"), "the payload is not the line's last member"
    return event_id, line[start:-1]


def read_lines(path: Path) -> dict[str, bytes]:
    """{event id: payload} of every line of a file-sink file (see `read_line`)."""
    return dict(read_line(line) for line in path.read_bytes().split(b"\n") if line)
