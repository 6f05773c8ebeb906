"""Where a member's value lies in the text of a JSON object, to the byte.

`member_spans(document, names)` reads a JSON object once, left to right, and returns for each
wanted top-level member the [start, end) byte range of its value: the value's text exactly as
written (its numbers, escapes, spacing inside it), so it can be sliced out instead of being
parsed and serialized again (a number like 1.10 or 123456789012345678901234567890 would not
survive that). Pure and linear in the length of the document.

The document must be valid JSON: validate it first (`parse` does, and returns the value). The scan then only
follows the structure: strings (with their escapes) are skipped whole, nested objects and arrays
by counting brackets outside strings, a scalar ends at the next delimiter. Member names are
compared after unescaping ("pay\\u006coad" is "payload"); of a name that occurs more than once,
the last occurrence counts, as with orjson and Python's json module. Something that is not a
JSON object, or a document cut short, raises ValueError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

import orjson

# A JSON string: no raw quote or backslash except in an escape (DOTALL: an escape's second byte
# is any byte). Unambiguous, so the regular expression engine never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
# What ends a number, true, false or null: a delimiter or whitespace.
_SCALAR_END = re.compile(rb"[ \t\n\r,\]}]")
# What matters inside a nested object or array: strings and brackets.
_NESTED = re.compile(rb'["\[\]{}]')
_QUOTE, _OPEN_OBJECT, _CLOSE_OBJECT, _OPEN_ARRAY = 0x22, 0x7B, 0x7D, 0x5B


def parse(document: bytes) -> Any:
    """The value of a JSON text; ValueError if it is not JSON. orjson reads it, and what orjson
    refuses although JSON allows it (a number beyond a double such as 1e400, an escaped lone
    surrogate) Python's json module reads, with its NaN and Infinity (not JSON) refused."""
    try:
        return orjson.loads(document)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(document.decode(), parse_int=_int, parse_constant=_not_json)
        except ValueError:
            raise exc from None
        except RecursionError:  # (nested deeper than Python's json can follow: orjson's limit is 1024)
            raise ValueError("nested too deeply") from None


def _int(text: str) -> int | float:
    # Python refuses to convert more than 4300 digits; the value is not used, its syntax was checked.
    return int(text) if len(text) < 4300 else float(text)


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def member_spans(document: bytes, names: Collection[str]) -> dict[str, tuple[int, int]]:
    """For a valid JSON text `document` that is an object: {name: (start, end)} for each of
    `names` that is a top-level member, `document[start:end]` being that member's value as
    written. Names not present are absent from the result."""
    wanted = {name.encode("utf-8", "surrogatepass"): name for name in names}
    spans: dict[str, tuple[int, int]] = {}
    pos = _skip_whitespace(document, 0)
    if pos >= len(document) or document[pos] != _OPEN_OBJECT:
        raise ValueError("not a JSON object")
    pos = _skip_whitespace(document, pos + 1)
    if document[pos : pos + 1] == b"}":
        return spans
    while True:
        key_end = _string_end(document, pos)
        raw = document[pos + 1 : key_end - 1]
        name = wanted.get(raw) if b"\\" not in raw else _unescaped_name(document[pos:key_end], wanted)
        pos = _skip_whitespace(document, key_end)
        if document[pos : pos + 1] != b":":
            raise ValueError(f"expected ':' at byte {pos}")
        start = _skip_whitespace(document, pos + 1)
        end = _value_end(document, start)
        if name is not None:
            spans[name] = (start, end)
        pos = _skip_whitespace(document, end)
        delimiter = document[pos : pos + 1]
        if delimiter == b"}":
            return spans
        if delimiter != b",":
            raise ValueError(f"expected ',' or '}}' at byte {pos}")
        pos = _skip_whitespace(document, pos + 1)


def _unescaped_name(quoted: bytes, wanted: dict[bytes, str]) -> str | None:
    name = json.loads(quoted.decode())  # (not orjson: an escaped lone surrogate is a valid name)
    return name if isinstance(name, str) and name.encode("utf-8", "surrogatepass") in wanted else None


def _skip_whitespace(document: bytes, pos: int) -> int:
    match = _WHITESPACE.match(document, pos)
    assert match is not None  # (it matches the empty string too)
    return match.end()


def _string_end(document: bytes, pos: int) -> int:
    """The end of the string starting at `pos` (just after its closing quote)."""
    match = _STRING.match(document, pos)
    if match is None:
        raise ValueError(f"expected a complete string at byte {pos}")
    return match.end()


def _value_end(document: bytes, pos: int) -> int:
    """The end of the value starting at `pos`."""
    if pos >= len(document):
        raise ValueError("the document ends where a value should be")
    first = document[pos]
    if first == _QUOTE:
        return _string_end(document, pos)
    if first in (_OPEN_OBJECT, _OPEN_ARRAY):
        depth = 0
        while True:
            match = _NESTED.search(document, pos)
            if match is None:
                raise ValueError("an object or array is not closed")
            found = match.start()
            byte = document[found]
            if byte == _QUOTE:
                pos = _string_end(document, found)
                continue
            pos = found + 1
            depth += 1 if byte in (_OPEN_OBJECT, _OPEN_ARRAY) else -1
            if depth == 0:
                return pos
    match = _SCALAR_END.search(document, pos)
    end = len(document) if match is None else match.start()
    if end == pos:
        raise ValueError(f"expected a value at byte {pos}")
    return end
