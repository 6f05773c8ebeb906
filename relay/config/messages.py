"""pydantic's validation errors as the config's problems: `file: key.path: reason`, the key path
as the user wrote it, the reason in plain words, and never the input (it may hold a password)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from outbox_relay.config.errors import join_key
from outbox_relay.registry import broken_plugins, sink_plugins, source_plugins


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    tags = set(source_plugins()) | set(sink_plugins())
    previous: int | str | None = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif previous in ("source", "sink") and part in tags:
            pass  # pydantic inserts the union tag into the path; users never wrote it
        elif part.startswith(("function-", "list[")):
            pass
        else:
            out = join_key(out, part)
        previous = part
    return out or "(top)"


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _bound(ctx: Mapping[str, Any], kind: str) -> str:
    return f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}"


def _union_tag(ctx: Mapping[str, Any], _: str) -> str:
    tag = str(ctx.get("tag"))
    if tag in broken_plugins:
        return f"type '{tag}' is installed but {broken_plugins[tag]}"
    known = ", ".join(sorted(t.strip("'") for t in str(ctx.get("expected_tags", "")).split(", ")))
    return f"unknown type '{tag}' (known: {known})"


#: The reason for each kind of pydantic error that has one of the config's own, from its context.
_REASONS: dict[str, Callable[[Mapping[str, Any], str], str]] = {
    "extra_forbidden": lambda ctx, kind: "unknown key",
    "missing": lambda ctx, kind: "required key is missing",
    **dict.fromkeys(_BOUNDS, _bound),
    "literal_error": lambda ctx, kind: f"must be one of {ctx.get('expected')}",
    "union_tag_invalid": _union_tag,
    "union_tag_not_found": lambda ctx, kind: "required key 'type' is missing",
    "too_short": lambda ctx, kind: f"must have at least {ctx.get('min_length')} item(s)",
    # (An empty `${VAR}` too: the variable is set, but to nothing.)
    "string_too_short": lambda ctx, kind: (
        "must not be empty"
        if ctx.get("min_length") == 1
        else f"must be at least {ctx.get('min_length')} characters long"
    ),
    "string_pattern_mismatch": lambda ctx, kind: f"must match {ctx.get('pattern')}",
}


def _reason(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in _REASONS:
        return _REASONS[kind](ctx, kind)
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"]).replace("Input should be", "must be")


def format_validation(file: str, exc: ValidationError) -> list[str]:
    # Inputs are never echoed: they may hold a password.
    return [f"{file}: {_location(e['loc'])}: {_reason(e)}" for e in exc.errors()]
