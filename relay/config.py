"""The config file: one YAML file per database, validated once at start.

Every problem is reported as `FILE: key.path: reason` and the CLI exits with status 2; no
traceback, no partially started relay. `${VAR}` and `${VAR:-default}` are replaced from the
environment inside string values before validation, so a missing variable names its key too;
as in a shell, the default is used when VAR is unset or empty.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from outbox_relay.durations import Duration
from outbox_relay.files import file_kind
from outbox_relay.identifiers import TableName, printable
from outbox_relay.pgsession import Dsn
from outbox_relay.registry import Claim, ConnectorConfig, broken_plugins, sink_plugins, source_plugins
from outbox_relay.secrets import is_secret_key, scrubber


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
    multiplier: float = Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description="Growth of the ceiling per attempt; more than 10 reaches max after an attempt or two.",
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetryConfig:
        if self.max < self.initial:
            raise ValueError("max must be >= initial")
        return self


class PipelineConfig(StrictModel):
    """How much the relay holds in memory and how it batches publishes."""

    max_in_flight: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Events held between fetch and source ack; bounds memory (a million events is"
        " gigabytes already).",
    )
    publish_batch_size: int = Field(default=1_000, ge=1, le=100_000, description="Events per sink call.")
    publish_concurrency: int = Field(default=2, ge=1, le=64, description="Sink calls at once.")
    per_aggregate_in_flight: int = Field(
        default=100,
        ge=1,
        le=100_000,
        description="Consecutive events of one aggregate in one sink call, for sinks that keep a "
        "call's order (1 with on_poison: block): what a hot aggregate moves per broker round trip.",
    )
    stats_interval: Duration = Field(
        default=5.0,
        ge=0.1,
        description="How often pending and lag are measured (a query each time: at least 100ms, so an"
        " idle relay does not keep the database busy).",
    )


class DeadLetterConfig(StrictModel):
    """What happens to an event the broker keeps refusing (a poison event)."""

    after_attempts: int = Field(
        default=10,
        ge=1,
        le=1_000_000,  # (the count is stored in an integer column; `on_poison: block` never parks)
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
    """One active relay per outbox among any number of replicas: a lease with a deadline, kept
    in a table of the source's database (see relay.leadership)."""

    enabled: bool = Field(default=True, description="Off only when a single relay runs, ever.")
    time: Duration = Field(
        default=5.0,
        ge=1.0,
        le=300.0,
        description="How long the lease lasts unless its holder renews it: a standby takes over a"
        " holder that stopped renewing (dead, frozen or cut off) within this time, and a holder"
        " that cannot renew stops publishing before it ends. 1s to 5m.",
    )
    check_interval: Duration = Field(
        default=1.0,
        ge=0.1,
        description="How often the active relay renews its lease (a query each time: at least"
        " 100ms, so an idle relay does not spin; at most a third of `time`, so that a renewal"
        " that fails can be retried before the lease ends).",
    )
    table: TableName = Field(
        default="outbox_relay_leases",
        description="The lease table, in the source's database; `init-db` creates it (and the"
        " relay does when it may). name or schema.name as in SQL.",
    )

    @model_validator(mode="after")
    def _renewals_fit_in_the_lease(self) -> LeaseConfig:
        if self.check_interval * 3 > self.time:
            raise ValueError(
                f"check_interval ({self.check_interval:g}s) must be at most a third of time"
                f" ({self.time:g}s): the holder must be able to retry a failed renewal before its"
                " lease ends"
            )
        return self


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
    stuck_after: Duration = Field(
        default=120.0,
        ge=1.0,
        description="/healthz fails (503) once one call of an active outbox to its database, broker or"
        " dead-letter table has been out this long: a hung call, since each is bounded by its"
        " connector's own timeout. Keep it well above the sink's timeouts.",
    )


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

_VAR = re.compile(r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|(?P<bad>\$\{)")
_BAD_REFERENCE = (
    "'${' starts no variable reference: write ${NAME} or ${NAME:-default} (NAME: letters, digits"
    " and _, not starting with a digit), or $${ for a literal '${'"
)


_NESTED_REFERENCE = (
    "a default value cannot contain '${': write ${NAME:-default} with a plain default (references"
    " do not nest)"
)


def _interpolate(value: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
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
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(value)]
    return value


def _join(path: str, key: object) -> str:
    shown = _shown_key(key)
    return f"{path}.{shown}" if path else shown


#: A key longer than this is cut in messages (an unknown key may be any text).
_KEY_SHOWN = 80


def _shown_key(key: object) -> str:
    """A mapping key for a one-line message: unprintable characters escaped, long ones cut."""
    text = printable(str(key))
    return text if len(text) <= _KEY_SHOWN else text[:_KEY_SHOWN] + "..."


# --- YAML within limits, refusing duplicate keys --------------------------------------------------

#: A config is small: these bound the time and memory of reading one, whatever the file holds.
MAX_FILE_BYTES = 1024 * 1024
#: Mappings and lists nested deeper than this are refused (a real config nests about 5 deep).
MAX_DEPTH = 32
#: Values in the document once every alias is expanded (a real config has tens per outbox).
MAX_VALUES = 20_000


class _PythonParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


if TYPE_CHECKING:
    _Parser = _PythonParser
else:
    try:
        # LibYAML scans and parses in C; PyYAML's Python scanner takes minutes on one long string.
        from yaml import CParser as _Parser
    except ImportError:  # PyYAML built without LibYAML
        _Parser = _PythonParser


class _StrictLoader(
    yaml.composer.Composer, yaml.constructor.SafeConstructor, yaml.resolver.Resolver, _Parser
):
    """A safe loader (PyYAML's composer on the parser's events) that refuses duplicate keys and,
    while composing (before anything is constructed), a document nested deeper than MAX_DEPTH,
    an alias inside the node it refers to, and a document whose aliases would expand it beyond
    MAX_VALUES values."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._values = 0
        #: Expanded size (in values) of each anchored node composed so far.
        self._sizes: dict[str, int] = {}
        #: Anchors whose node is still being composed: an alias to one of them is a cycle.
        self._open: set[str] = set()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        anchor: str | None = event.anchor
        if isinstance(event, yaml.AliasEvent):
            if anchor in self._open:
                _refuse(f"alias *{anchor} is inside the node it refers to", event)
            self._count(self._sizes.get(anchor or "", 1), event)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            _refuse(f"nested more than {MAX_DEPTH} levels deep", event)
        before = self._values
        self._count(1, event)
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = self._values - before
        self._depth -= 1
        return node

    def _count(self, values: int, event: Any) -> None:
        self._values += values
        if self._values > MAX_VALUES:
            _refuse(
                f"more than {MAX_VALUES} values once its aliases are expanded; a config is small"
                " (an alias may repeat a small mapping a few times, not multiply the document)",
                event,
            )

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors raise plain Python errors for some values (an integer of more
        than 4300 digits, a date with month 13): each becomes invalid YAML at the value."""
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError, ArithmeticError, LookupError) as exc:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {exc}", node.start_mark
            ) from None


#: The tag of a key written as text (a `<<` merge key is a mapping merged in).
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TEXT_TAGS = (yaml.resolver.BaseResolver.DEFAULT_SCALAR_TAG, _MERGE_TAG)
_KEY_KINDS = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
}


def _text_problems(node: yaml.Node, path: str, seen: set[int], problems: list[tuple[yaml.Mark, str]]) -> None:
    """Keys that are not text (a list, a mapping, `true`, `8080`, `~`) and text that is not
    Unicode (a lone surrogate written as an escape), with their key path, before anything is
    constructed: a config's keys are names, and every text must be encodable as UTF-8."""
    if id(node) in seen:  # (an alias: checked where its anchor is)
        return
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        problem = _lone_surrogate(node.value)
        if problem:
            problems.append((node.start_mark, f"{path or '(top)'}: {problem}"))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _text_problems(item, f"{path}[{index}]", seen, problems)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            where = path or "(top)"
            if isinstance(key, yaml.SequenceNode | yaml.MappingNode):
                kind = "a list" if isinstance(key, yaml.SequenceNode) else "a mapping"
                problems.append((key.start_mark, f"{where}: a key must be text, not {kind}"))
                continue
            text = key.value if isinstance(key, yaml.ScalarNode) else ""
            shown = _shown_key(text)
            problem = _lone_surrogate(text)
            if problem:
                problems.append((key.start_mark, f"{where}: key {shown}: {problem}"))
                continue
            if key.tag not in _TEXT_TAGS:
                kind = _KEY_KINDS.get(key.tag, f"tagged {key.tag}")
                problems.append(
                    (key.start_mark, f"{where}: key {shown} is {kind}, not text (quote it: '{shown}')")
                )
                continue
            _text_problems(value, _join(path, text), seen, problems)


def _lone_surrogate(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = f"\\u{ord(text[exc.start]):04x}"
        return f"contains {code}, a lone surrogate: not a character (write the character itself)"
    return None


def _refuse(problem: str, event: Any) -> NoReturn:
    raise yaml.composer.ComposerError(None, None, problem, event.start_mark)


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue  # (its mapping is merged in by construct_mapping; keys written here win)
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(  # type: ignore[type-var]
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


def check_offline(config: RelayConfig, file: str = "relay.yaml") -> None:
    """What a config means beyond its shape, checked without any network: each connector's own
    `validate` hook (a client library's verdict on its settings), and no two outboxes reading
    one table, replication slot or publication. Raises ConfigError."""
    problems: list[str] = []
    for index, outbox in enumerate(config.outboxes):
        ends = (("source", outbox.source, source_plugins()), ("sink", outbox.sink, sink_plugins()))
        for role, connector, plugins in ends:
            plugin = plugins.get(connector.type)
            if plugin is None or plugin.validate is None or plugin.missing_requirement() is not None:
                continue  # (building the connector says which extra to install)
            for key, reason in plugin.validate(connector):
                where = f"outboxes[{index}].{role}"
                problems.append(f"{file}: {_join(where, key) if key else where}: {reason}")
    problems += [f"{file}: {problem}" for problem in shared_reads(config)]
    if problems:
        raise ConfigError(problems)


def shared_reads(config: RelayConfig) -> list[str]:
    """Two outboxes that read one table, slot or publication, as far as the config says: the
    same name in the same database (an unqualified table name matches any schema's)."""
    problems: list[str] = []
    seen: list[tuple[int, Claim]] = []
    for index, outbox in enumerate(config.outboxes):
        for claim in outbox.source.claims():
            for other_index, other in seen:
                if other_index == index or not _same_place(claim, other):
                    continue
                problems.append(shared_problem(config, index, claim, other_index, other))
                break
            seen.append((index, claim))
    return problems


def _same_place(a: Claim, b: Claim) -> bool:
    if a.kind != b.kind or a.place != b.place or a.name != b.name:
        return False
    return a.schema == b.schema or a.schema is None or b.schema is None


_WHY_ALONE = {
    "table": "two outboxes on one table race for its events, and each sink gets only some of them",
    "replication slot": "a slot streams to one reader at a time, and confirms what either one acknowledged",
    "publication": "both outboxes would publish every event it sends",
}


def shared_problem(config: RelayConfig, index: int, claim: Claim, other_index: int, other: Claim) -> str:
    """The sentence refusing `claim` of outbox `index`, which outbox `other_index` reads too."""
    first = config.outboxes[other_index].name
    where = f"outboxes[{index}].source.{claim.key}"
    text = (
        f"{where}: {claim.kind} {claim.shown} is also read by outbox '{first}'"
        f" (outboxes[{other_index}].source.{other.key}: {other.shown}); {_WHY_ALONE.get(claim.kind, '')}."
        f" Give each outbox its own {claim.kind}, or relay it from one outbox"
    )
    if claim.schema != other.schema:
        text += (
            " (an unqualified table name is found through the search_path and may be the same table;"
            " if they differ, write each with its schema)"
        )
    return text


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
    text = _read_text(file)
    data = _parse_yaml(text, file)
    config = parse_config(data, file, env)
    check_offline(config, file)
    return config


def _parse_yaml(text: str, file: str) -> Any:
    """The document's data; ConfigError for anything the YAML does not allow or the config
    cannot hold (keys that are not text), each with its line and column."""
    try:
        loader = _StrictLoader(text)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(file, exc)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        found: list[tuple[yaml.Mark, str]] = []
        _text_problems(node, "", set(), found)
        if found:
            raise ConfigError([f"{_at(file, mark)}: {problem}" for mark, problem in found])
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError([_yaml_problem(file, exc)]) from None
    except RecursionError:  # (MAX_DEPTH stops nesting long before; this is a last resort)
        raise ConfigError([f"{file}: invalid YAML: nested too deep"]) from None
    except (ValueError, TypeError, OverflowError, ArithmeticError, LookupError) as exc:
        # (construct_object turns these into YAML errors with a position; this is a last resort)
        raise ConfigError([f"{file}: invalid YAML: {printable(str(exc))}"]) from None
    finally:
        loader.dispose()


def _yaml_problem(file: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{_at(file, mark)}: invalid YAML: {printable(problem)}"


def _at(file: str, mark: yaml.Mark | None) -> str:
    return f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file


def _read_text(file: str) -> str:
    """The file's text: at most MAX_FILE_BYTES of UTF-8 without NUL bytes, else one line why."""
    if not file:
        raise ConfigError(["no config file given (pass its path with -c)"])
    try:
        # Without blocking: opening a FIFO for reading waits for a writer, forever.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise ConfigError([f"{file}: is a directory, not a config file"]) from None
    except OSError as exc:
        try:  # (a socket cannot be opened at all: say what it is)
            mode = os.stat(file).st_mode
        except OSError:
            mode = stat.S_IFREG
        if not stat.S_ISREG(mode):
            raise ConfigError([_not_regular(file, mode)]) from None
        raise ConfigError([f"{file}: cannot read the file: {exc.strerror or exc}"]) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise ConfigError([f"{file}: is a directory, not a config file"])
        raise ConfigError([_not_regular(file, mode)])
    with open(fd, "rb", closefd=True) as stream:
        try:
            raw = stream.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError([f"{file}: cannot read the file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            [f"{file}: the file is larger than {MAX_FILE_BYTES // 1024} KiB; a config file is small"]
        )
    if b"\x00" in raw:
        raise ConfigError([f"{file}: the file is binary (it contains NUL bytes), not YAML text"])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = f"the file is not UTF-8 text (byte {exc.start + 1} is not UTF-8)"
        raise ConfigError([f"{file}: {problem}"]) from None


def _not_regular(file: str, mode: int) -> str:
    return f"{file}: is {file_kind(mode)}, not a regular file; a config is a file"


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of the config file (committed as config/relay.schema.json)."""
    schema = config_model().model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "outbox-relay configuration"
    return schema
