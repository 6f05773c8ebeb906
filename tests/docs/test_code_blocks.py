"""Every fenced block of README.md and docs/ that is a command or a config is exercised: a relay
config through `outbox-relay check`, chart values rendered with the chart, each command line
checked dry (an `outbox-relay` line parsed by the CLI itself), Python compiled and the
write_event example run against a private PostgreSQL. A block shows output only when marked
```text. A block or command that no runner accepts fails with its file and line; the only
exceptions are EXEMPTIONS below, each with its reason."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.docs.config_blocks import run_yaml
from tests.docs.markdown_blocks import ROOT, Block, all_blocks, install_block
from tests.docs.shell_commands import (
    check_helm,
    check_make,
    check_python_module,
    command_lines,
    parse_relay_args,
    relay_args_inside,
)


@dataclass(frozen=True)
class Exemption:
    command: tuple[str, ...]  # the leading words of the command lines it covers
    reason: str


EXEMPTIONS = [
    Exemption(
        ("pip", "install"),
        "installs from a package index: tests/integration/test_install.py runs the README's install"
        " block, tests/contract/test_plugin_author.py builds and installs the wheel",
    ),
    Exemption(("python", "-m", "build"), "builds the wheel: tests/contract/test_plugin_author.py does"),
    Exemption(("docker", "build"), "needs a Docker daemon: tests/deploy checks the Dockerfile"),
    Exemption(("docker", "push"), "needs a registry"),
    Exemption(("kubectl", "create"), "needs a cluster: the rendered chart refers to these Secrets"),
    Exemption(("helm", "install"), "needs a cluster: its chart and values are rendered by the blocks"),
]
OUTPUT_LANGS = {"text"}
SHELL_LANGS = {"sh", "bash", "shell"}
SNIPPET = "--8<--"
BLOCKS = all_blocks()


def exemption_for(words: list[str]) -> Exemption | None:
    """The exemption whose program is this line's and whose other words all appear in it (so
    `kubectl -n shop create` is a `kubectl create`)."""
    return next(
        (e for e in EXEMPTIONS if words[0] == e.command[0] and set(e.command[1:]) <= set(words[1:])),
        None,
    )


def is_test_module_run(words: list[str]) -> bool:
    """`python -m tests.bench.NAME ...`: one of the repository's own modules."""
    return words[0] in ("python", "python3") and words[1:2] == ["-m"] and words[2].startswith("tests.")


def check_command(words: list[str]) -> None:
    relay_args = relay_args_inside(words)
    if words[0] == "outbox-relay":
        parse_relay_args(words[1:])
    elif relay_args is not None:
        parse_relay_args(relay_args)
    elif words[0] == "make":
        check_make(words)
    elif is_test_module_run(words):
        check_python_module(words)
    elif words[0] == "helm" and words[1] in ("lint", "template", "dependency"):
        check_helm(words)
    elif exemption_for(words) is None:
        raise AssertionError("no runner accepts this command line, and no exemption names it")


def run_shell(block: Block) -> None:
    if block == install_block(BLOCKS):
        return  # tests/integration/test_install.py runs it, by this name
    for words in command_lines(block.text):
        try:
            check_command(words)
        except Exception as exc:  # any failure, named with the block's place
            pytest.fail(f"{block.where}: {' '.join(words)}: {exc}")


def run_write_event(code: str, dsn: str) -> None:
    """The write_event example in a transaction with an `orders` row, as the README writes it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id text PRIMARY KEY, status text NOT NULL)")
        conn.execute("INSERT INTO orders VALUES ('o-1', 'placed')")
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    exec(compile(code, "<block>", "exec"), {"dsn": dsn, "order_id": "o-1", "tp": tp})
    with psycopg.connect(dsn) as conn:
        query = "SELECT aggregate_id, event_type, headers->>'traceparent' FROM outbox"
        events = conn.execute(query).fetchall()
        status = conn.execute("SELECT status FROM orders").fetchone()
    assert events == [("o-1", "OrderPaid", tp)]
    assert status == ("paid",)


def run_block(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.lang in OUTPUT_LANGS:
        return
    if block.text.startswith(SNIPPET):
        included = block.text.split('"')[1]
        assert included.startswith("helm/outbox-relay/examples/"), "only the chart's examples are included"
        assert (ROOT / included).is_file(), f"{block.where}: no such file {included}"
        return  # the example chart is rendered by tests/deploy/test_helm_chart.py
    if block.lang in SHELL_LANGS:
        run_shell(block)
    elif block.lang == "yaml":
        run_yaml(block.text, tmp_path)
    elif block.lang == "python":
        code = compile(block.text, block.where, "exec")
        if "write_event(" in block.text:
            run_write_event(block.text, request.getfixturevalue("dsn"))
        assert code is not None
    elif block.lang == "toml":
        groups = tomllib.loads(block.text)["project"]["entry-points"]
        assert set(groups) <= {"outbox_relay.sinks", "outbox_relay.sources"}, sorted(groups)
    else:
        pytest.fail(f"{block.where}: no runner accepts a ```{block.lang or '(no language)'} block")


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_every_documented_command_and_config_works(
    block: Block, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    try:
        run_block(block, tmp_path, request)
    except Exception as exc:  # a refusal by check, Helm or the parser: named with the block's place
        pytest.fail(f"{block.where}: {type(exc).__name__}: {exc}")


def test_every_exemption_still_covers_a_documented_command() -> None:
    commands = [w for b in BLOCKS if b.lang in SHELL_LANGS for w in command_lines(b.text)]
    unused = [e.command for e in EXEMPTIONS if not any(exemption_for(w) == e for w in commands)]
    assert not unused, f"exemptions no command needs any more: {unused}"


def test_the_readme_install_block_is_the_one_the_install_test_runs() -> None:
    block = install_block(BLOCKS)
    assert block.text.startswith("git clone https://github.com/outbox-relay/outbox-relay.git")
    assert "outbox-relay --version" in block.text
