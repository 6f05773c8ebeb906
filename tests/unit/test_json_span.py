"""relay.json_span: the exact bytes of a member's value in a JSON object."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from outbox_relay.json_span import member_spans, parse


def _payload(document: bytes) -> bytes | None:
    span = member_spans(document, ["payload"]).get("payload")
    return None if span is None else document[span[0] : span[1]]


# --- examples -------------------------------------------------------------------------------------


def test_the_value_is_sliced_as_written_numbers_and_all() -> None:
    payload = b'{"a":123456789012345678901234567890,"price":1.10,"n":1e2,"m":1E+2,"z":-0,"f":-0.0}'
    document = b'{"event_id":"e1","payload":' + payload + b',"headers":{}}'
    assert _payload(document) == payload


@pytest.mark.parametrize(
    "value",
    [
        b'"caf\xc3\xa9 \\u0000 \\ud83d\\ude00 \xf0\x9f\x98\x80 \\"q\\" \\\\ \\/ \\n"',
        b'[1.0, 2.50, [], {}, [[["]"]]], {"}": "{"}]',
        b'{ "x" : { "y" : [ "\\\\", "\\"" ] } }',
        b"true",
        b"false",
        b"null",
        b"-0.0E-0",
        b'""',
        b"{}",
        b"[]",
    ],
)
def test_every_kind_of_value_is_sliced_whole(value: bytes) -> None:
    document = b'{"before":"}\\"{[","payload":' + value + b',"after":[1,{"payload":2}]}'
    assert _payload(document) == value
    assert orjson.loads(_payload(document) or b"") == orjson.loads(document)["payload"]


def test_whitespace_around_the_value_is_not_part_of_it() -> None:
    document = b' \r\n\t{ \n "payload" \t:\r\n  [1,\n 2]  \n , "x" : 1 \n} \n'
    assert _payload(document) == b"[1,\n 2]"


def test_a_name_spelled_with_escapes_is_the_same_name() -> None:
    document = b'{"pay\\u006coad": 1.50, "p\\u0061yload2": 2}'
    assert _payload(document) == b"1.50"
    assert member_spans(b'{"\\u00e9": 1, "\xc3\xa9": 2}', ["\u00e9"]) == {"\u00e9": (20, 21)}


def test_of_a_name_given_twice_the_last_counts_as_with_orjson() -> None:
    document = b'{"payload": 1, "other": 0, "pay\\u006coad": {"b": 2.0}, "x": 3}'
    assert _payload(document) == b'{"b": 2.0}'
    assert orjson.loads(document)["payload"] == {"b": 2.0}


def test_a_missing_member_is_absent_and_an_empty_object_has_none() -> None:
    assert member_spans(b'{"a": 1}', ["payload"]) == {}
    assert member_spans(b"{}", ["payload"]) == {}
    assert member_spans(b" { } ", ["payload"]) == {}


def test_several_members_in_one_pass() -> None:
    document = b'{"a": 1, "b": "two", "c": [3]}'
    spans = member_spans(document, ["a", "c", "z"])
    assert {name: document[s:e] for name, (s, e) in spans.items()} == {"a": b"1", "c": b"[3]"}


@pytest.mark.parametrize("document", [b"[1]", b'"payload"', b"1", b"null", b"", b"   "])
def test_a_document_that_is_not_an_object_is_refused(document: bytes) -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        member_spans(document, ["payload"])


# What member_spans says of a document cut short or malformed.
_MALFORMED = (
    r"^(an object or array is not closed|the document ends where a value should be"
    r"|expected .+ at byte \d+)$"
)


@pytest.mark.parametrize(
    "document",
    [
        b'{"payload": [1, 2',
        b'{"payload": "abc',
        b'{"payload"',
        b'{"payload": ',
        b'{"a" 1}',
        b'{"a": 1 "b": 2}',
    ],
)
def test_a_document_cut_short_or_malformed_is_refused_not_misread(document: bytes) -> None:
    with pytest.raises(ValueError, match=_MALFORMED):
        member_spans(document, ["payload"])


def test_big_documents_take_linear_time() -> None:
    """Inputs on which anything quadratic would take hours: 5 MB strings full of escapes,
    100,000 nested arrays, 100,000 members."""
    escapes = b'"' + b'\\"\\\\' * 1_250_000 + b'"'
    nested = b"[" * 100_000 + b"]" * 100_000
    members = b"{" + b",".join(b'"k%d":[%d,"\\\\"]' % (i, i) for i in range(100_000))
    started = time.perf_counter()
    assert _payload(b'{"x":' + escapes + b',"payload":' + escapes + b"}") == escapes
    assert _payload(b'{"payload":' + nested + b"}") == nested
    assert _payload(members + b',"payload":7}') == b"7"
    assert time.perf_counter() - started < 10


# --- properties -------------------------------------------------------------------------------------

_WHITESPACE = st.sampled_from(["", " ", "\n", "\t", "\r\n", "  \n\t "])
_NUMBER = st.from_regex(r"-?(0|[1-9][0-9]{0,40})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?", fullmatch=True)
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


@st.composite
def _json_string(draw: st.DrawFn, text: st.SearchStrategy[str] | None = None) -> str:
    """A JSON string literal for some text, each character written raw or escaped at random
    (\\uXXXX, with surrogate pairs beyond the BMP, or a short escape; `\\/` for a slash)."""
    value = draw(text if text is not None else st.text(max_size=12))
    out = ['"']
    for char in value:
        code = ord(char)
        how = draw(st.integers(0, 2))
        if 0xD800 <= code <= 0xDFFF:
            how = 1  # a lone surrogate is not valid UTF-8: only an escape can spell it (orjson refuses it)
        if how == 0 and code >= 0x20 and char not in '"\\':
            out.append(char)
        elif how == 2 and char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif how == 2 and char == "/":
            out.append("\\/")
        elif code > 0xFFFF:
            high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
            out.append(f"\\u{high:04x}\\u{low:04X}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def _valid_strings() -> st.SearchStrategy[str]:
    return _json_string(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12))


def _scalar() -> st.SearchStrategy[str]:
    return st.one_of(_NUMBER, st.sampled_from(["true", "false", "null"]), _valid_strings())


@st.composite
def _container(draw: st.DrawFn, values: st.SearchStrategy[str]) -> str:
    def ws() -> str:
        return draw(_WHITESPACE)

    if draw(st.booleans()):
        items = draw(st.lists(values, max_size=4))
        return "[" + ws() + ("," + ws()).join(item + ws() for item in items) + "]"
    members = draw(st.lists(st.tuples(_valid_strings(), values), max_size=4))
    body = ("," + ws()).join(f"{key}{ws()}:{ws()}{value}{ws()}" for key, value in members)
    return "{" + ws() + body + "}"


_VALUE = st.recursive(_scalar(), lambda inner: _container(inner), max_leaves=12)
_PAYLOAD_NAMES = st.sampled_from(["payload", "pay\\u006coad", "\\u0070ayload", "\\u0070\\u0061\\u0079load"])


@st.composite
def _document(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """An outbox message as some writer might format it, and the exact text of its `payload`."""
    members: list[tuple[str, str]] = []
    expected: str | None = None
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            name, value = '"' + draw(_PAYLOAD_NAMES) + '"', draw(_VALUE)
            expected = value
        else:
            name, value = draw(_valid_strings()), draw(_VALUE)
            if orjson.loads(name) == "payload":
                expected = value
        members.append((name, value))
    ws = _WHITESPACE
    body = ",".join(f"{draw(ws)}{name}{draw(ws)}:{draw(ws)}{value}{draw(ws)}" for name, value in members)
    document = f"{draw(ws)}{{{body}{draw(ws) if not members else ''}}}{draw(ws)}"
    return document.encode(), None if expected is None else expected.encode()


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(_document())
@example((b'{"payload":1,"payload":2.50}', b"2.50"))
def test_the_slice_is_the_value_text_as_written(case: tuple[bytes, bytes | None]) -> None:
    document, expected = case
    parse(document)  # (the generator writes valid JSON only)
    assert _payload(document) == expected


def _all_members(document: bytes) -> dict[str, Any]:
    parse(document)  # valid JSON, as the relay sees it
    value = _read(document)
    assert isinstance(value, dict)
    return value


def _read(text: bytes) -> Any:
    """One parser for a whole document and for a slice alike: `parse` may read them with
    different ones (orjson, or Python's json for what orjson refuses, 1E400 say), which disagree
    on an integer beyond 64 bits (a float in orjson, exact in Python)."""
    return json.loads(text)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(_container(_VALUE).filter(lambda text: text.startswith("{")))
@example('{"":true,"":1E400,"":20000000000000000001}')
def test_every_member_sliced_parses_to_what_a_parser_sees(text: str) -> None:
    document = text.encode()
    members = _all_members(document)
    spans = member_spans(document, list(members))
    assert set(spans) == set(members)
    for name, (start, end) in spans.items():
        assert _read(document[start:end]) == members[name]
        assert document[start:end] == document[start:end].strip(b" \t\r\n")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    _document(), st.lists(st.tuples(st.integers(0, 10_000), st.binary(max_size=3)), min_size=1, max_size=4)
)
def test_a_mutated_document_either_fails_validation_or_is_sliced_right(
    case: tuple[bytes, bytes | None], edits: list[tuple[int, bytes]]
) -> None:
    """Fuzz: bytes replaced, inserted or removed at random. Whatever orjson still accepts as an
    object, the slices agree with it; what it rejects is never sliced (the caller validates)."""
    document = bytearray(case[0])
    for offset, replacement in edits:
        at = offset % (len(document) + 1)
        document[at : at + len(replacement) % 2 + 1] = replacement
    mutated = bytes(document)
    try:
        parsed = parse(mutated)
    except ValueError:
        return
    if not isinstance(parsed, dict):
        with pytest.raises(ValueError, match="not a JSON object"):
            member_spans(mutated, ["payload"])
        return
    spans = member_spans(mutated, list(parsed))
    assert set(spans) == set(parsed)
    assert all(parse(mutated[s:e]) == parsed[name] for name, (s, e) in spans.items())


@pytest.mark.parametrize(
    ("document", "value"),
    [
        (b'{"n": 1E400}', {"n": float("inf")}),  # JSON has no range limit; orjson refuses it
        (b'{"s": "\\ud800"}', {"s": "\ud800"}),  # an escaped lone surrogate: JSON, not orjson's
        (b'{"big": 1%s}' % (b"0" * 5000), {"big": float("inf")}),
        (b'{"price": 1.10}', {"price": 1.1}),
    ],
)
def test_parse_accepts_all_json(document: bytes, value: Any) -> None:
    assert parse(document) == value


@pytest.mark.parametrize(
    "document",
    [
        b'{"n": NaN}',
        b'{"n": Infinity}',
        b"[-Infinity]",
        b"\xef\xbb\xbf{}",
        b'{"a": 1} x',
        b'"\xff"',
        b"{'a': 1}",
        b"",
    ],
)
def test_parse_refuses_what_is_not_json(document: bytes) -> None:
    with pytest.raises(json.JSONDecodeError):
        parse(document)


def test_python_json_agrees_on_the_examples_too() -> None:
    # The other common parser keeps the last duplicate and reads escaped names the same way.
    document = b'{"payload": 1, "pay\\u006coad": [2.50]}'
    assert json.loads(document)["payload"] == orjson.loads(_payload(document) or b"")


def test_a_document_nested_too_deeply_is_not_json_here_not_a_crash() -> None:
    deep = b'{"payload": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with pytest.raises(ValueError, match="nested too deeply"):
        parse(deep)
