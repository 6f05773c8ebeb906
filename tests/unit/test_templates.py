from __future__ import annotations

import pytest

from outbox_relay.events import OutboxEvent
from outbox_relay.templates import Template, check_template


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("outbox.{aggregate_typ}", "uses unknown field {aggregate_typ}"),
        ("outbox.{}", "has a positional field"),
        ("outbox.{aggregate_type", "is malformed"),
        ("{aggregate_id!r}", "takes no format spec or conversion"),
    ],
)
def test_bad_templates_are_refused_with_the_reason(template: str, problem: str) -> None:
    with pytest.raises(ValueError, match="topic template") as caught:
        check_template(template, "topic")
    assert problem in str(caught.value)


def test_good_templates_return_their_literal_parts() -> None:
    assert check_template("outbox.{aggregate_type}.v1", "topic") == ["outbox.", ".v1"]


@pytest.mark.parametrize(
    "template",
    [
        "{aggregate_id}",
        "outbox.{aggregate_type}",
        "{aggregate_type}.{event_type}.{aggregate_type}",
        "fixed-topic",
        "literal.{{braces}}",
        "{position}",
        "{event_id}",
    ],
)
def test_compiled_templates_render_like_format_map(template: str) -> None:
    for aggregate_id in ("42", None):
        event = OutboxEvent(7, "e-1", "order", aggregate_id, "Created", b"{}", {}, 0.0)
        assert Template(template, "topic").render(event) == template.format_map(event.template_fields())


def test_compiled_templates_are_checked_like_plain_ones() -> None:
    with pytest.raises(ValueError, match="uses unknown field"):
        Template("outbox.{aggregate_typ}", "topic")
