"""NATS subjects as the sink sees them: the stream subjects that cover a subject template, which
stream subjects overlap, and what a rendered subject or a template's words may not hold. Pure."""

from __future__ import annotations

import re
import string

FIELD = re.compile(r"\{[^{}]*\}")


def default_subjects(template: str) -> list[str]:
    """The stream subjects that cover every subject the template renders: each token with a field
    becomes `*`, and a last token with a field becomes `>` (a field value may contain dots)."""
    tokens = ["*" if FIELD.search(token) else token for token in template.split(".")]
    if tokens[-1] == "*":
        tokens[-1] = ">"
    return [".".join(tokens)]


def literal_prefix(template: str) -> str:
    """The text of a subject template before its first field (all of it without fields)."""
    first = next(iter(string.Formatter().parse(template)), None)
    return "" if first is None else first[0]


def may_cover(stream_subject: str, template: str) -> bool:
    """Whether a stream subject (with NATS wildcards `*` and `>`) matches the subjects the template
    renders, as far as its literal prefix tells: the whole subject when it has no field, else the
    complete tokens before the first field (what follows depends on each event)."""
    pattern = stream_subject.split(".")
    prefix = literal_prefix(template)
    has_field = prefix != template.replace("{{", "{").replace("}}", "}")
    tokens = prefix.split(".")
    if has_field:
        tokens = tokens[:-1]  # (the token the field is in is not known)
    for index, token in enumerate(tokens):
        if index >= len(pattern):
            return False
        if pattern[index] == ">":
            return True
        if pattern[index] not in ("*", token):
            return False
    if has_field:
        return len(pattern) > len(tokens)
    return len(pattern) == len(tokens)


def words_problem(subject: str, what: str, shown: str | None = None) -> str | None:
    """Why a subject (or a stream subject, or a template's words) is not one NATS takes, or None:
    whitespace, an empty word, or a `$` start (`$JS.`, `$SYS.`: the server's own subjects)."""
    what = f"{what} {shown if shown is not None else repr(subject)}"
    if any(c.isspace() for c in subject):
        return f"{what} contains whitespace"
    if any(word == "" for word in subject.split(".")):
        return f"{what} has an empty word ('..', or a '.' at its start or end)"
    if subject.startswith("$"):
        return f"{what} starts with '$': those subjects belong to the server ($JS, $SYS)"
    return None


def subjects_collide(first: str, second: str) -> bool:
    """Whether some subject matches both stream subjects (NATS wildcards `*` one word, `>` the rest):
    JetStream refuses a stream whose subjects overlap."""
    a, b = first.split("."), second.split(".")
    for x, y in zip(a, b, strict=False):
        if ">" in (x, y):
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(a) == len(b)


def subject_problem(subject: str) -> str | None:
    """Why a rendered subject cannot be published to, or None."""
    if not subject:
        return "the subject is empty"
    if any(c.isspace() for c in subject):
        return f"subject {subject!r} contains whitespace"
    tokens = subject.split(".")
    if any(token == "" for token in tokens):
        return f"subject {subject!r} has an empty token (an empty field value, or '..')"
    if any(token in ("*", ">") for token in tokens):
        return f"subject {subject!r} contains a wildcard token"
    return None
