"""The config file: one YAML file per database, validated once at start.

Every problem is reported as `FILE: key.path: reason` and the CLI exits with status 2; no
traceback, no partially started relay. `${VAR}` and `${VAR:-default}` are replaced from the
environment inside string values before validation, so a missing variable names its key too;
as in a shell, the default is used when VAR is unset or empty.

The parts, each with one job: file_reader (the file's text), yaml_reader (its YAML, within
limits), environment (`${VAR}`), models (the shape and its defaults), messages (pydantic's
errors in the config's words), checks (what the config means beyond its shape), errors (how a
problem is told). This module runs them in turn.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from outbox_relay.config.checks import check_offline, shared_problem, shared_reads
from outbox_relay.config.environment import interpolate
from outbox_relay.config.errors import ConfigError
from outbox_relay.config.file_reader import MAX_FILE_BYTES, read_text
from outbox_relay.config.messages import format_validation
from outbox_relay.config.models import (
    DeadLetterConfig,
    HttpConfig,
    LeaseConfig,
    LogConfig,
    OutboxConfig,
    PipelineConfig,
    RelayConfig,
    RetryConfig,
    StrictModel,
    config_json_schema,
    config_model,
)
from outbox_relay.config.yaml_reader import MAX_DEPTH, MAX_VALUES, parse_yaml
from outbox_relay.secrets import is_secret_key, scrubber

__all__ = [
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_VALUES",
    "ConfigError",
    "DeadLetterConfig",
    "HttpConfig",
    "LeaseConfig",
    "LogConfig",
    "OutboxConfig",
    "PipelineConfig",
    "RelayConfig",
    "RetryConfig",
    "StrictModel",
    "check_offline",
    "config_json_schema",
    "config_model",
    "load_config",
    "parse_config",
    "shared_problem",
    "shared_reads",
]


def parse_config(data: Any, file: str = "relay.yaml", env: Mapping[str, str] | None = None) -> RelayConfig:
    """Validate already-parsed YAML. Raises ConfigError with every problem found."""
    if data is None:
        raise ConfigError([f"{file}: the file is empty; it needs an 'outboxes' list"])
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: the top level must be a mapping with an 'outboxes' list"])
    problems: list[str] = []
    data = interpolate(data, "", os.environ if env is None else env, problems)
    if problems:
        raise ConfigError([f"{file}: {p}" for p in problems])
    _remember_secrets(data)
    try:
        return config_model().model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(file, exc)) from None


def _remember_secrets(value: Any) -> None:
    if isinstance(value, str):
        scrubber.remember_from(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if is_secret_key(str(key)) and isinstance(item, str | int):
                scrubber.remember(str(item))
            _remember_secrets(item)
    elif isinstance(value, list):
        for item in value:
            _remember_secrets(item)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> RelayConfig:
    """Read, interpolate and validate a config file. Raises ConfigError."""
    file = str(path)
    text = read_text(file)
    data = parse_yaml(text, file)
    config = parse_config(data, file, env)
    check_offline(config, file)
    return config
