"""The config file: one YAML file per database, validated once at start.

Every problem is reported as `FILE: key.path: reason` and the CLI exits with status 2; no
traceback, no partially started relay. `${VAR}` and `${VAR:-default}` are replaced from the
environment inside string values before validation, so a missing variable names its key too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from relay.durations import Duration
from relay.identifiers import TableName
from relay.pgsession import Dsn
from relay.registry import ConnectorConfig, broken_plugins, sink_plugins, source_plugins
from relay.secrets import is_secret_key, scrubber


class ConfigError(Exception):
    """One or more problems in a config file, each already formatted as `file: key: reason`."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(StrictModel):
    """Exponential backoff with full jitter between attempts of one event."""

    initial: Duration = Field(default=0.1, gt=0, description="First backoff ceiling.")
    max: Duration = Field(default=30.0, gt=0, description="Largest backoff ceiling.")
    multiplier: float = Field(default=2.0, ge=1.0)

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetryConfig:
        if self.max < self.initial:
            raise ValueError("max must be >= initial")
        return self


class PipelineConfig(StrictModel):
    """How much the relay holds in memory and how it batches publishes."""

    max_in_flight: int = Field(
        default=10_000, ge=1, description="Events held between fetch and source ack; bounds memory."
    )
    publish_batch_size: int = Field(default=1_000, ge=1, description="Events per sink call.")
    publish_concurrency: int = Field(default=2, ge=1, le=64, description="Sink calls at once.")
    per_aggregate_in_flight: int = Field(
        default=100,
        ge=1,
        description="Consecutive events of one aggregate in one sink call, for sinks that keep a "
        "call's order (1 with on_poison: block): what a hot aggregate moves per broker round trip.",
    )
    stats_interval: Duration = Field(default=5.0, gt=0, description="How often pending and lag are measured.")


class DeadLetterConfig(StrictModel):
    """What happens to an event the broker keeps refusing (a poison event)."""

    after_attempts: int = Field(
        default=10,
        ge=1,
        description="Refusals by the broker before the event is parked; outages do not count.",
    )
    on_poison: Literal["dead_letter", "block"] = Field(
        default="dead_letter",
        description="dead_letter: park it and let its aggregate move on; block: keep retrying it, "
        "holding back the rest of its aggregate (order over progress).",
    )
    table: TableName = Field(
        default="outbox_relay_dead_letters",
        description="In the source's database; `init-db` creates it. name or schema.name as in SQL.",
    )
    dsn: Dsn | None = Field(default=None, description="Another database for it; default: the source's.")


class LeaseConfig(StrictModel):
    """One active relay per outbox among any number of replicas (a PostgreSQL advisory lock)."""

    enabled: bool = Field(default=True, description="Off only when a single relay runs, ever.")
    check_interval: Duration = Field(
        default=1.0, gt=0, description="How often the active relay confirms it still holds the lease."
    )


class OutboxConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    source: ConnectorConfig
    sink: ConnectorConfig
    retry: RetryConfig = RetryConfig()
    pipeline: PipelineConfig = PipelineConfig()
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    lease: LeaseConfig = LeaseConfig()

    def dead_letter_dsn(self) -> str | None:
        return self.dead_letter.dsn or getattr(self.source, "dsn", None)


class HttpConfig(StrictModel):
    host: str = "0.0.0.0"
    port: int = Field(default=9400, ge=0, le=65535, description="0 turns the HTTP server off.")


class LogConfig(StrictModel):
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON otherwise."
    )
    level: Literal["debug", "info", "warning", "error"] = "info"


class RelayConfig(StrictModel):
    outboxes: list[OutboxConfig] = Field(min_length=1)
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    shutdown_grace: Duration = Field(
        default=30.0, gt=0, description="How long SIGTERM waits for in-flight events."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> RelayConfig:
        seen: set[str] = set()
        for outbox in self.outboxes:
            if outbox.name in seen:
                raise ValueError(f"outbox name '{outbox.name}' is used twice")
            seen.add(outbox.name)
        return self


def _union(classes: Iterable[type[ConnectorConfig]]) -> Any:
    members = tuple(classes)
    if len(members) == 1:
        return members[0]
    return Annotated[Union[members], Field(discriminator="type")]  # noqa: UP007 - dynamic union


@cache
def config_model() -> type[RelayConfig]:
    """RelayConfig with `source` and `sink` narrowed to the union of installed connector configs."""
    sources = _union(p.config for p in source_plugins().values())
    sinks = _union(p.config for p in sink_plugins().values())
    outbox = create_model("OutboxConfig", __base__=OutboxConfig, source=(sources, ...), sink=(sinks, ...))
    return create_model(
        "RelayConfig",
        __base__=RelayConfig,
        outboxes=(list[outbox], Field(min_length=1)),
    )


# --- environment interpolation -------------------------------------------------------------------

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def _interpolate(value: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match["name"], match["default"]
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(f"{path or '(top)'}: environment variable {name} is not set")
            return ""

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    return value


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


# --- YAML that refuses duplicate keys ------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    pass


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _mapping_without_duplicates,
)


# --- pydantic errors as `key.path: reason` -------------------------------------------------------


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
            out = _join(out, part)
        previous = part
    return out or "(top)"


def _reason(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {
            "greater_than_equal": ">=",
            "greater_than": ">",
            "less_than_equal": "<=",
            "less_than": "<",
        }
        bound = next(iter(ctx.values()))
        return f"must be {op[kind]} {bound}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "union_tag_invalid" and str(ctx.get("tag")) in broken_plugins:
        return f"type '{ctx.get('tag')}' is installed but {broken_plugins[str(ctx.get('tag'))]}"
    if kind == "union_tag_invalid":
        known = ", ".join(sorted(t.strip("'") for t in str(ctx.get("expected_tags", "")).split(", ")))
        return f"unknown type '{ctx.get('tag')}' (known: {known})"
    if kind == "union_tag_not_found":
        return "required key 'type' is missing"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind in ("string_pattern_mismatch",):
        return f"must match {ctx.get('pattern')}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return str(error["msg"]).replace("Input should be", "must be")


def _format_validation(file: str, exc: ValidationError) -> list[str]:
    # Inputs are never echoed: they may hold a password.
    return [f"{file}: {_location(e['loc'])}: {_reason(e)}" for e in exc.errors()]


def parse_config(data: Any, file: str = "relay.yaml", env: Mapping[str, str] | None = None) -> RelayConfig:
    """Validate already-parsed YAML. Raises ConfigError with every problem found."""
    if data is None:
        raise ConfigError([f"{file}: the file is empty; it needs an 'outboxes' list"])
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: the top level must be a mapping with an 'outboxes' list"])
    problems: list[str] = []
    data = _interpolate(data, "", os.environ if env is None else env, problems)
    if problems:
        raise ConfigError([f"{file}: {p}" for p in problems])
    _remember_secrets(data)
    try:
        return config_model().model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(file, exc)) from None


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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file}: the file is not UTF-8 text"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    return parse_config(data, file, env)


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of the config file (committed as config/relay.schema.json)."""
    schema = config_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "outbox-relay configuration"
    return schema
