"""`${VAR}` and `${VAR:-default}` in string values, replaced from the environment before the
config is validated (as in a shell, the default serves when VAR is unset or empty); `$${` is a
literal `${`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from outbox_relay.config.errors import join_key

_VAR = re.compile(r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bad>\$\{)")
_BAD_REFERENCE = (
    "'${' starts no variable reference: write ${NAME} or ${NAME:-default} (NAME: letters, digits"
    " and _, not starting with a digit), or $${ for a literal '${'"
)


_NESTED_REFERENCE = (
    "a default value cannot contain '${': write ${NAME:-default} with a plain default (references"
    " do not nest)"
)


def interpolate(value: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match["bad"] is not None:
                # (Nothing after it is echoed: it may be part of a password.)
                problems.append(f"{path or '(top)'}: {_BAD_REFERENCE}")
                return ""
            name, default = match["name"], match["default"]
            if name is None:
                return "${"
            if default is not None and "${" in default:
                # (Nested references are not read: the first '}' would end the outer one.)
                problems.append(f"{path or '(top)'}: {_NESTED_REFERENCE}")
                return ""
            value = env.get(name)
            # As in a shell: `${NAME:-default}` takes the default when NAME is unset or empty.
            if value is not None and (value or default is None):
                return value
            if default is not None:
                return default
            problems.append(f"{path or '(top)'}: environment variable {name} is not set")
            return ""

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: interpolate(v, join_key(path, k), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    return value
