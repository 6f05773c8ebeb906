"""How the config's problems are told: each one line, `file: key.path: reason`."""

from __future__ import annotations

from collections.abc import Sequence

from outbox_relay.identifiers import printable


class ConfigError(Exception):
    """One or more problems in a config file, each already formatted as `file: key: reason`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def join_key(path: str, key: object) -> str:
    shown = shown_key(key)
    return f"{path}.{shown}" if path else shown


#: A key longer than this is cut in messages (an unknown key may be any text).
_KEY_SHOWN = 80


def shown_key(key: object) -> str:
    """A mapping key for a one-line message: unprintable characters escaped, long ones cut."""
    text = printable(str(key))
    return text if len(text) <= _KEY_SHOWN else text[:_KEY_SHOWN] + "..."
