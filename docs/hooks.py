"""MkDocs hook: the configuration page's reference section is made from the config models when
the site is built, so no committed copy can go stale."""

from __future__ import annotations

from typing import Any

from outbox_relay.config.reference import config_reference

#: The line of docs/configuration.md that the generated reference replaces.
MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri != "configuration.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/configuration.md lost its marker line {MARKER}")
    return markdown.replace(MARKER, config_reference())
