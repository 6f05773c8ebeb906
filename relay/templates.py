"""Templates over an event's fields, such as `outbox.{aggregate_type}` or `{aggregate_id}`, used
by sinks for topics, keys and routing keys. Checked once when the config is loaded, so a typo is
a config error naming the key, not a failure on every event."""

from __future__ import annotations

import string

#: The names a template may use (see OutboxEvent.template_fields).
TEMPLATE_FIELDS: tuple[str, ...] = ("event_id", "event_type", "aggregate_type", "aggregate_id", "position")


def check_template(template: str, what: str) -> list[str]:
    """Raise ValueError (a message naming `what`) when `template` cannot be rendered for every
    event; return its literal parts so a sink can check them against its own naming rules."""
    available = ", ".join(TEMPLATE_FIELDS)
    where = f"{what} template {template!r}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{where} is malformed ({exc}); write literal braces as {{{{ }}}}") from None
    literals: list[str] = []
    for literal, name, spec, conversion in parts:
        literals.append(literal)
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"{where} has a positional field {{}}; name one of: {available}")
        if name not in TEMPLATE_FIELDS:
            raise ValueError(f"{where} uses unknown field {{{name}}}; available: {available}")
        if spec or conversion:
            raise ValueError(f"{where}: field {{{name}}} takes no format spec or conversion")
    return literals
