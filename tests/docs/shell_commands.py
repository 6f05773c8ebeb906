"""Command lines of a shell block, and the dry checks that each one would work: an
`outbox-relay` line is parsed by the CLI itself (options, choices, types, required ones) without
running it; a `make` target must exist; a benchmark module must exist and know its options; a
Helm command must name the repository's chart."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click

from outbox_relay.cli import cli
from tests.docs.markdown_blocks import ROOT

_OPERATORS = {"&&", "||", ";", "|", "&"}
_REDIRECTS = {">", ">>", "<", "2>"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def command_lines(text: str) -> Iterator[list[str]]:
    """Each simple command of a block as its words: continuation lines joined, comments and
    redirections dropped, split at `&&`, `;` and pipes; leading VAR=value assignments and
    `export` lines set the environment, they are not commands."""
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        tokens = iter(lexer)
        for token in tokens:
            if token in _OPERATORS:
                yield from _command(words)
                words = []
            elif token in _REDIRECTS:
                next(tokens, None)
            else:
                words.append(token)
        yield from _command(words)


def _command(words: list[str]) -> Iterator[list[str]]:
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    if words and words[0] != "export":
        yield words


def parse_relay_args(args: list[str]) -> None:
    """Parse an `outbox-relay` command line as the CLI would, down to its subcommand, without
    invoking it: a UsageError names what is wrong."""
    command: click.Command = cli
    path = ["outbox-relay"]
    words = list(args)
    while isinstance(command, click.Group) and words and not words[0].startswith("-"):
        sub = command.get_command(click.Context(command), words[0])
        if sub is None:
            raise click.UsageError(f"no such command {words[0]!r} in {' '.join(path)}")
        command, path, words = sub, [*path, words[0]], words[1:]
    try:
        command.make_context(" ".join(path), words, resilient_parsing=False)
    except click.exceptions.Exit as exc:  # --version and --help end parsing, successfully
        if exc.exit_code != 0:
            raise


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m[1] for m in re.finditer(r"^([A-Za-z][\w.-]*):", text, re.MULTILINE)}


def check_make(words: list[str]) -> None:
    missing = set(words[1:]) - make_targets()
    assert not missing, f"no such make target: {sorted(missing)}"


def check_python_module(words: list[str]) -> None:
    """`python -m tests.bench.NAME --opt ...`: the module exists and declares every option."""
    module = words[words.index("-m") + 1]
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"no module {module}"
    assert spec.origin is not None, f"{module} is not a file"
    source = Path(spec.origin).read_text(encoding="utf-8")
    unknown = [w for w in words if w.startswith("--") and f'"{w}"' not in source]
    assert not unknown, f"{module} has no option {unknown}"


def check_helm(words: list[str]) -> None:
    """`helm lint|template|dependency build`: every repository path it names exists, and one of
    them is a chart (the chart itself is rendered by the YAML blocks and tests/deploy)."""
    paths = [w for w in words if w.startswith("helm/")]
    assert paths, "names no chart of this repository"
    for path in paths:
        assert (ROOT / path).exists(), f"no such path {path}"
    assert any((ROOT / p / "Chart.yaml").is_file() for p in paths), "names no chart directory"


def relay_args_inside(words: list[str]) -> list[str] | None:
    """The outbox-relay arguments a `kubectl exec ... -- outbox-relay ...` or a
    `docker run ... IMAGE ARGS` line passes to the relay (the image's entrypoint is the CLI)."""
    if words[0] == "kubectl" and "--" in words:
        rest = words[words.index("--") + 1 :]
        return rest[1:] if rest and rest[0] == "outbox-relay" else None
    if words[:2] == ["docker", "run"]:
        images = [i for i, w in enumerate(words) if re.search(r"/outbox-relay(:[\w.-]+)?$", w)]
        if not images:
            return None
        return words[images[0] + 1 :] or image_cmd()
    return None


def image_cmd() -> list[str]:
    """The arguments the image passes to its `outbox-relay` entrypoint when given none (its CMD)."""
    commands = re.findall(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    return list(json.loads(commands[-1]))
