"""PostgreSQL names in the config, read as PostgreSQL reads them (relay.identifiers)."""

from __future__ import annotations

import pytest
from psycopg import sql
from pydantic import BaseModel, ValidationError

from outbox_relay.identifiers import (
    ColumnName,
    IdentifierError,
    QualifiedName,
    TableName,
    identifier,
    parse_identifier,
    parse_table_name,
    printable,
    quote_ident,
)


@pytest.mark.parametrize(
    ("text", "schema", "name"),
    [
        ("outbox", None, "outbox"),
        ("public.outbox", "public", "outbox"),
        ("public.OutBox", "public", "outbox"),
        ("PUBLIC.OUTBOX", "public", "outbox"),
        ('"OutBox"', None, "OutBox"),
        ('public."OutBox"', "public", "OutBox"),
        ('"Odd.Schema"."Out Box"', "Odd.Schema", "Out Box"),
        ('"a""b"', None, 'a"b'),
        ('""""', None, '"'),
        ('"x; DROP TABLE canary; --"', None, "x; DROP TABLE canary; --"),
        ('"back\\slash"', None, "back\\slash"),
        ('"new\nline"', None, "new\nline"),
        ("_x$1", None, "_x$1"),
        ("ÄÖü", None, "ÄÖü"),  # non-ASCII letters are kept as they are: only A-Z fold
        ("Éa.Ba", "Éa", "ba"),
        ("straße", None, "straße"),
        ("select", None, "select"),  # a keyword is just a name here: it is always quoted in SQL
        ("a" * 63, None, "a" * 63),
        ("é" * 31 + "a", None, "é" * 31 + "a"),  # 63 bytes in UTF-8
        ('"' + "x" * 63 + '"', None, "x" * 63),
    ],
)
def test_table_names_are_read_as_postgresql_reads_them(text: str, schema: str | None, name: str) -> None:
    assert parse_table_name(text) == QualifiedName(schema, name)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "must not be empty"),
        ("public.", "ends with a dot"),
        (".outbox", "has an empty part"),
        ("a..b", "has an empty part"),
        ('""', 'has an empty double-quoted part ("")'),
        ('"OutBox', "has an unbalanced double quote"),
        ('"a""', "has an unbalanced double quote"),
        ('Out"Box"', "has a double quote inside a part"),
        ('"Out"Box', "text follows a closing double quote"),
        ('"a" .b', "text follows a closing double quote"),
        ("db.public.outbox", "has more than two dot-separated parts"),
        ('"a"."b"."c"', "has more than two dot-separated parts"),
        ('"nul\x00"', "must not contain a NUL character"),
        ("a" * 64, "a name part is 64 bytes long, PostgreSQL allows 63"),
        ("é" * 32, "a name part is 64 bytes long, PostgreSQL allows 63"),
        ('public."' + "x" * 64 + '"', "a name part is 64 bytes long"),
        ("out box", "not a valid unquoted name: out box"),
        ("1outbox", "not a valid unquoted name: 1outbox"),
        ("$outbox", "not a valid unquoted name"),
        ("out-box", "not a valid unquoted name"),
        (" outbox", "not a valid unquoted name"),
        ("outbox;DROP TABLE canary", "not a valid unquoted name"),
        ("x'; DROP TABLE canary; --", "not a valid unquoted name"),
        ("public.out\\box", "not a valid unquoted name"),
        ("\ud800", "is not valid Unicode text"),
    ],
)
def test_bad_table_names_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(IdentifierError) as caught:
        parse_table_name(text)
    assert reason in str(caught.value)


def test_an_invalid_unquoted_name_is_refused_with_its_double_quoted_spelling() -> None:
    with pytest.raises(IdentifierError) as caught:
        parse_table_name("public.Out Box")
    assert str(caught.value) == (
        "not a valid unquoted name: Out Box (a letter or _ first, then letters, digits, _ or $);"
        " to use it as it is, double-quote it: '\"Out Box\"'"
    )


def test_error_messages_stay_on_one_line_whatever_the_name_holds() -> None:
    with pytest.raises(IdentifierError) as caught:
        parse_table_name("bad\nname\r\x1b")
    assert "\n" not in str(caught.value)
    assert "\r" not in str(caught.value)
    assert "bad\\nname\\r\\x1b" in str(caught.value)
    assert printable("a\tb\u2028c") == "a\\tb\\u2028c"


def test_column_and_publication_names_are_one_part() -> None:
    assert parse_identifier("EventId") == "eventid"
    assert parse_identifier('"EventId"') == "EventId"
    assert parse_identifier('"with.dot"') == "with.dot"
    assert identifier('"Odd ""Col"""') == sql.Identifier('Odd "Col"')
    for bad, reason in [
        ("a.b", "is one name, without a schema; double-quote it if the dot is part of the name"),
        ("", "must not be empty"),
        ("a b", "not a valid unquoted name"),
        ('"x', "unbalanced"),
        ("c" * 64, "64 bytes long"),
    ]:
        with pytest.raises(IdentifierError, match=reason):
            parse_identifier(bad)


def test_psycopg_identifiers_keep_unqualified_names_unqualified() -> None:
    assert parse_table_name("OutBox").identifier() == sql.Identifier("outbox")
    assert parse_table_name('"Odd.Schema"."Out Box"').identifier() == sql.Identifier("Odd.Schema", "Out Box")
    assert parse_table_name('x."a""b"').identifier().as_string() == '"x"."a""b"'


def test_regclass_text_quotes_every_part_so_the_server_looks_up_exactly_those_names() -> None:
    assert parse_table_name("outbox").regclass_text() == '"outbox"'
    assert parse_table_name("public.OutBox").regclass_text() == '"public"."outbox"'
    assert parse_table_name('"Odd.Schema"."Out ""Box"""').regclass_text() == '"Odd.Schema"."Out ""Box"""'


def test_display_quotes_only_where_postgresql_quote_ident_would() -> None:
    assert quote_ident("outbox") == "outbox"
    assert quote_ident("out_box2") == "out_box2"
    for name in ("OutBox", "2x", "a$b", "a b", 'a"b', "é", "select", "user", "table", "", "x.y"):
        assert quote_ident(name) == '"' + name.replace('"', '""') + '"'
    assert quote_ident("name") == "name"  # an unreserved keyword needs no quotes
    assert parse_table_name('"Odd.Schema"."Out Box"').display() == '"Odd.Schema"."Out Box"'
    assert str(parse_table_name("PUBLIC.outbox")) == "public.outbox"


@pytest.mark.parametrize(
    "text", ["outbox", "public.OutBox", '"OutBox"', '"Odd.Schema"."Out Box"', '"a""b".c', "é.ß", '"select"']
)
def test_the_display_form_reads_back_as_the_same_name(text: str) -> None:
    parsed = parse_table_name(text)
    assert parse_table_name(parsed.display()) == parsed


class _Model(BaseModel):
    table: TableName = "public.outbox"
    column: ColumnName | None = "event_id"


def test_pydantic_types_keep_the_text_as_written_and_refuse_bad_names() -> None:
    model = _Model(table="public.OutBox", column='"EventId"')
    assert (model.table, model.column) == ("public.OutBox", '"EventId"')
    assert _Model(column=None).column is None
    with pytest.raises(ValidationError) as caught:
        _Model(table="a.b.c")
    (error,) = caught.value.errors()
    assert error["type"] == "value_error"
    assert "more than two dot-separated parts" in str(error["ctx"]["error"])
    with pytest.raises(ValidationError):
        _Model(column="a.b")
    schema = _Model.model_json_schema()["properties"]
    assert schema["table"]["type"] == "string"
    assert "pattern" in schema["table"]
