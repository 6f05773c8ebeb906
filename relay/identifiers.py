"""PostgreSQL names written in the config (tables, columns, a publication), read the way
PostgreSQL reads them in SQL, so `check`, `init-db` and `run` all mean the same object.

The rules:

- A table name is `name` or `schema.name`; a column or publication name is one `name`.
- Each part is either unquoted or double-quoted.
- An unquoted part starts with a letter or `_` and goes on with letters, digits, `_` and `$`.
  Any non-ASCII character counts as a letter, as in PostgreSQL. ASCII `A`-`Z` fold to lower
  case and nothing else changes, exactly as PostgreSQL folds: `public.OutBox` is
  `public.outbox`.
- A double-quoted part is taken exactly as written between the quotes: case is kept, `""`
  stands for one `"`, and it may hold dots, spaces, semicolons, anything except NUL. So
  `"Odd.Schema"."Out Box"` is the table `Out Box` in the schema `Odd.Schema`. (In YAML, put
  such a name in single quotes: `table: '"OutBox"'`.)
- Refused, with the reason: an empty name or part, an unbalanced quote, text after a closing
  quote other than a dot, more than two parts (or a dot in a column name), a NUL character, a
  part longer than 63 bytes in UTF-8 (PostgreSQL would silently cut it to 63 and use another
  name), and an unquoted part that is not a valid unquoted name (the message says to
  double-quote it).

An unqualified table name is resolved by the server through the connection's search_path:
`regclass_text()` is the text for `to_regclass()` that makes the server look up exactly these
names; `identifier()` is what goes into statements (`psycopg.sql`), never string formatting.

The config keeps the text as written (`check` prints it); the `TableName`, `ColumnName` and
`Identifier` types only validate it, and the code parses it where it uses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

from psycopg import sql
from pydantic import AfterValidator, WithJsonSchema

#: PostgreSQL's NAMEDATALEN - 1: longer names are truncated by the server, so we refuse them.
MAX_BYTES = 63

_UNQUOTED = re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*")
_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SAFE = re.compile(r"[a-z_][a-z0-9_]*")

# Keywords PostgreSQL's quote_ident() quotes (every category but "unreserved", as of
# PostgreSQL 16). Only the display form depends on it.
_KEYWORD_LIST = """
    all analyse analyze and any array as asc asymmetric authorization between bigint binary bit
    boolean both case cast char character check coalesce collate collation column concurrently
    constraint create cross current_catalog current_date current_role current_schema current_time
    current_timestamp current_user dec decimal default deferrable desc distinct do else end except
    exists extract false fetch float for foreign freeze from full grant greatest group grouping
    having ilike in initially inner inout int integer intersect interval into is isnull join
    lateral leading least left like limit localtime localtimestamp national natural nchar none
    normalize not notnull null nullif numeric offset on only or order out outer overlaps overlay
    placing position precision primary real references returning right row select session_user
    setof similar smallint some substring symmetric system_user table tablesample then time
    timestamp to trailing treat trim true union unique user using values varchar variadic verbose
    when where window with xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces
    xmlparse xmlpi xmlroot xmlserialize xmltable
"""
_KEYWORDS = frozenset(_KEYWORD_LIST.split())


class IdentifierError(ValueError):
    """A name in the config that is not a valid PostgreSQL name; the message says why."""


@dataclass(frozen=True, slots=True)
class QualifiedName:
    """A table name as the server sees it: `schema` is None when the name is unqualified (the
    server then resolves it through its search_path)."""

    schema: str | None
    name: str

    def identifier(self) -> sql.Identifier:
        """For `psycopg.sql` statements: `"schema"."name"`, or `"name"` when unqualified."""
        if self.schema is None:
            return sql.Identifier(self.name)
        return sql.Identifier(self.schema, self.name)

    def regclass_text(self) -> str:
        """The text for `to_regclass()`, every part double-quoted: the server looks up exactly
        these names (an unqualified one through its search_path), with no folding."""
        return ".".join(_always_quoted(part) for part in self.parts())

    def display(self) -> str:
        """As one would write it (in SQL and in the config): parts quoted only where needed.
        For messages: an unprintable character (a newline in a quoted name) shows escaped."""
        return printable(".".join(quote_ident(part) for part in self.parts()))

    def parts(self) -> tuple[str, ...]:
        return (self.name,) if self.schema is None else (self.schema, self.name)

    def __str__(self) -> str:
        return self.display()


def parse_table_name(text: str) -> QualifiedName:
    """`name` or `schema.name` as PostgreSQL reads it; raises IdentifierError."""
    parts = _parse_parts(text, 2)
    if len(parts) == 1:
        return QualifiedName(None, parts[0])
    return QualifiedName(parts[0], parts[1])


def parse_identifier(text: str) -> str:
    """One name (a column, a publication) as PostgreSQL reads it; raises IdentifierError."""
    return _parse_parts(text, 1)[0]


def identifier(text: str) -> sql.Identifier:
    """`parse_identifier` for `psycopg.sql` statements."""
    return sql.Identifier(parse_identifier(text))


def derived_name(name: str, suffix: str) -> str:
    """`<name><suffix>` (an index named after its table), the name cut at a character boundary
    when needed so that the whole stays within PostgreSQL's 63 bytes and keeps its suffix (as
    PostgreSQL names indexes itself): the server would otherwise cut the suffix."""
    while len((name + suffix).encode()) > MAX_BYTES:
        name = name[:-1]
    return name + suffix


def quote_ident(name: str) -> str:
    """`name` as PostgreSQL's quote_ident() writes it: bare when it reads back as itself (lower
    case letters, digits and `_`, not starting with a digit, not a keyword), else double-quoted."""
    if _SAFE.fullmatch(name) and name not in _KEYWORDS:
        return name
    return _always_quoted(name)


def _always_quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def printable(text: str) -> str:
    """`text` for a one-line message: control and other unprintable characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@lru_cache(maxsize=1024)
def _parse_parts(text: str, most: int) -> tuple[str, ...]:
    if not text:
        raise IdentifierError("must not be empty")
    if "\x00" in text:
        raise IdentifierError("must not contain a NUL character")
    found = _split_parts(text)
    if len(found) > most:
        if most == 1:
            raise IdentifierError(
                "is one name, without a schema; double-quote it if the dot is part of the name"
            )
        raise IdentifierError(
            "has more than two dot-separated parts; write name or schema.name, and double-quote"
            " a part that contains a dot"
        )
    parts = tuple(name if quoted else _folded(name) for name, quoted in found)
    for part in parts:
        _check_length(part)
    return parts


def _split_parts(text: str) -> list[tuple[str, bool]]:
    """The dot-separated parts of a name as written: (text, quoted); unquoted ones are checked
    once counted."""
    found: list[tuple[str, bool]] = []
    i, end = 0, len(text)
    while True:
        if text.startswith('"', i):
            name, i = _quoted_part(text, i)
            found.append((name, True))
        else:
            stop = text.find(".", i)
            stop = end if stop < 0 else stop
            found.append((_unquoted_text(text[i:stop]), False))
            i = stop
        if i == end:
            return found
        if text[i] != ".":
            raise IdentifierError(
                "text follows a closing double quote; a double-quoted part must end at a dot"
                " or at the end of the name"
            )
        i += 1
        if i == end:
            raise IdentifierError("ends with a dot: a name part is empty")


def _check_length(part: str) -> None:
    try:
        size = len(part.encode("utf-8"))
    except UnicodeEncodeError:
        raise IdentifierError("is not valid Unicode text") from None
    if size > MAX_BYTES:
        raise IdentifierError(
            f"a name part is {size} bytes long, PostgreSQL allows {MAX_BYTES} (it would silently"
            " cut the name and use another one)"
        )


def _quoted_part(text: str, start: int) -> tuple[str, int]:
    """The name in the double-quoted part at `start`, and the index after its closing quote."""
    pieces: list[str] = []
    i = start + 1
    while True:
        close = text.find('"', i)
        if close < 0:
            raise IdentifierError('has an unbalanced double quote (write "" for a quote inside a name)')
        pieces.append(text[i:close])
        if text.startswith('"', close + 1):  # "" inside: one quote character
            pieces.append('"')
            i = close + 2
            continue
        name = "".join(pieces)
        if not name:
            raise IdentifierError('has an empty double-quoted part ("")')
        return name, close + 1


def _unquoted_text(raw: str) -> str:
    if not raw:
        raise IdentifierError("has an empty part: write name or schema.name")
    if '"' in raw:
        raise IdentifierError(
            "has a double quote inside a part; double quotes must enclose a whole part, and"
            ' "" stands for a quote inside it'
        )
    return raw


def _folded(raw: str) -> str:
    """An unquoted part as PostgreSQL reads it: only ASCII A-Z fold to lower case."""
    if not _UNQUOTED.fullmatch(raw):
        raise IdentifierError(
            f"not a valid unquoted name: {printable(raw)} (a letter or _ first, then letters,"
            f" digits, _ or $); to use it as it is, double-quote it: '{printable(_always_quoted(raw))}'"
        )
    return raw.translate(_FOLD)


def _validator(parse: Callable[[str], object]) -> AfterValidator:
    def validate(text: str) -> str:
        try:
            parse(text)
        except IdentifierError as exc:
            raise ValueError(str(exc)) from None
        return text

    return AfterValidator(validate)


_PART = r'(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*|"(?:[^"\u0000]|"")+")'

#: A table name in the config: `name` or `schema.name` (see the module docstring).
TableName = Annotated[
    str,
    _validator(parse_table_name),
    WithJsonSchema({"type": "string", "pattern": f"^{_PART}(\\.{_PART})?$"}),
]
#: A column name in the config: one name, unquoted (folded to lower case) or double-quoted.
ColumnName = Annotated[
    str,
    _validator(parse_identifier),
    WithJsonSchema({"type": "string", "pattern": f"^{_PART}$"}),
]
#: Any other single PostgreSQL name in the config (a publication).
Identifier = ColumnName
