"""Templates over an event's fields, such as `outbox.{aggregate_type}` or `{aggregate_id}`, used
by sinks for topics, keys and routing keys. Checked once when the config is loaded, so a typo is
a config error naming the key, not a failure on every event."""

from __future__ import annotations

import string
from collections.abc import Callable

from outbox_relay.events import FIELD_VALUES, OutboxEvent

TEMPLATE_FIELDS: tuple[str, ...] = tuple(FIELD_VALUES)


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


class Template:
    """A checked template, compiled once into a positional format over the fields it names, so
    rendering reads only those fields and builds no dict per event."""

    __slots__ = ("_format", "_getters", "fields")

    def __init__(self, text: str, what: str) -> None:
        check_template(text, what)
        positional: list[str] = []
        getters: list[Callable[[OutboxEvent], str]] = []
        fields: list[str] = []
        for literal, name, _, _ in string.Formatter().parse(text):
            positional.append(literal.replace("{", "{{").replace("}", "}}"))
            if name is not None:
                positional.append("{}")
                getters.append(FIELD_VALUES[name])
                fields.append(name)
        #: The names of the fields it uses.
        self.fields = frozenset(fields)
        self._format = "".join(positional).format
        self._getters = tuple(getters)

    def render(self, event: OutboxEvent) -> str:
        getters = self._getters
        if len(getters) == 1:  # the common shapes: `{aggregate_id}`, `outbox.{aggregate_type}`
            return self._format(getters[0](event))
        return self._format(*[value(event) for value in getters])
