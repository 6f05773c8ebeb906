"""YAML read within limits (size of the expanded document, depth), refusing duplicate keys,
keys that are not text and text that is not Unicode, each problem with its line and column."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from outbox_relay.config.errors import ConfigError, join_key, shown_key
from outbox_relay.identifiers import printable

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
            problem = _key_problem(key, path or "(top)")
            if problem:
                problems.append((key.start_mark, problem))
            else:
                _text_problems(value, join_key(path, key.value), seen, problems)


def _key_problem(key: yaml.Node, where: str) -> str | None:
    """Why a mapping's key (at `where`) cannot be a config's key, or None: it is text."""
    if isinstance(key, yaml.SequenceNode | yaml.MappingNode):
        kind = "a list" if isinstance(key, yaml.SequenceNode) else "a mapping"
        return f"{where}: a key must be text, not {kind}"
    text = key.value if isinstance(key, yaml.ScalarNode) else ""
    shown = shown_key(text)
    problem = _lone_surrogate(text)
    if problem:
        return f"{where}: key {shown}: {problem}"
    if key.tag not in _TEXT_TAGS:
        kind = _KEY_KINDS.get(key.tag, f"tagged {key.tag}")
        return f"{where}: key {shown} is {kind}, not text (quote it: '{shown}')"
    return None


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


def parse_yaml(text: str, file: str) -> Any:
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
