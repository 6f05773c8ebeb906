"""The configuration reference of the documentation, made from the config's JSON schema when the
site is built (docs/hooks.py), so the page cannot disagree with the models it describes."""

from __future__ import annotations

import json
from typing import Any

from outbox_relay.config.models import config_json_schema

Schema = dict[str, Any]

#: The sections in the order a reader meets them in a config file; the connectors follow.
_SECTIONS = ("OutboxConfig", "RetryConfig", "PipelineConfig", "DeadLetterConfig", "LeaseConfig")
_TOP_LEVEL = ("HttpConfig", "LogConfig")
_SHORT_PATTERN = 40
_BOUND_WORDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("minLength", "length >="))


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _link(name: str) -> str:
    return f"[{name}](#{name.lower()})"


def _is_duration(prop: Schema) -> bool:
    options = prop.get("anyOf", [])
    return any(o.get("type") == "string" and "ms|s|m|h" in o.get("pattern", "") for o in options)


def _type_of(prop: Schema) -> str:
    """A property's type in words: links to the models it refers to."""
    if _is_duration(prop):
        return "duration"
    if "$ref" in prop:
        return _link(_ref_name(prop["$ref"]))
    if "const" in prop:
        return f"`{prop['const']}`"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    for key in ("oneOf", "anyOf"):
        if key in prop:
            kinds = [_type_of(option) for option in prop[key]]
            return " or ".join(k for k in kinds if k != "null") + (" or null" if "null" in kinds else "")
    if prop.get("type") == "array":
        return f"list of {_type_of(prop.get('items', {}))}"
    if prop.get("type") == "object":
        return "mapping"
    return str(prop.get("type", "any"))


def _default_of(prop: Schema, required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in prop:
        return ""
    value = prop["default"]
    if _is_duration(prop) and isinstance(value, int | float):
        return f"`{value:g}s`"
    if isinstance(value, dict) and value:
        return "see the section"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def _bounds(prop: Schema) -> str:
    """Limits the schema states, in words (durations carry theirs in the description)."""
    words = []
    for key, word in _BOUND_WORDS:
        if key in prop and not _is_duration(prop):
            words.append(f"{word} {prop[key]}")
    if 0 < len(prop.get("pattern", "")) <= _SHORT_PATTERN:  # long ones (SQL names) are told in words
        words.append(f"matches `{_cell(prop['pattern'])}`")
    return f" ({', '.join(words)})" if words else ""


def model_section(name: str, model: Schema) -> list[str]:
    """One model as a heading, its description and a table of its keys."""
    lines = [f"### {name}", ""]
    if model.get("description"):
        lines += [" ".join(model["description"].split()), ""]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    required = set(model.get("required", []))
    for key, prop in model.get("properties", {}).items():
        meaning = _cell(prop.get("description", "")) + _bounds(prop)
        lines.append(
            f"| `{key}` | {_type_of(prop)} | {_default_of(prop, key in required)} | {meaning.strip()} |"
        )
    return [*lines, ""]


def _ordered(defs: dict[str, Schema]) -> list[str]:
    outbox = defs["OutboxConfig"]["properties"]
    connectors = [_ref_name(o["$ref"]) for key in ("source", "sink") for o in outbox[key].get("oneOf", [])]
    first = [*_SECTIONS, *connectors, *_TOP_LEVEL]
    return [n for n in first if n in defs] + sorted(n for n in defs if n not in first)


def config_reference(schema: Schema | None = None) -> str:
    """Markdown for every key of the config file, top level first, then each model once."""
    schema = schema if schema is not None else config_json_schema()
    defs: dict[str, Schema] = schema["$defs"]
    lines = model_section("RelayConfig", {**schema, "description": "The file's top level."})
    for name in _ordered(defs):
        lines += model_section(name, defs[name])
    return "\n".join(lines)
