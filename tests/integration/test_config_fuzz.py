"""Bad config files, generated: every one is refused by `check` (and `run`) with exit code 2, a
line that names the key (or what is wrong with the file), no traceback, a bounded number of
lines, in bounded time and memory. Most run in this process through the CLI's click command (the
interpreter starts once); a handful run as real `outbox-relay` processes, whose memory is
measured by the kernel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from click.testing import CliRunner

from outbox_relay.cli import cli

#: Bounds per file: generous (a good file takes well under a second), the bugs took minutes and GBs.
TIME_BOUND_S = 10.0
PYTHON_MEMORY_BOUND = 100 * 1024 * 1024  # peak of Python allocations while checking one file
PROCESS_MEMORY_BOUND_KB = 300 * 1024  # maxrss of one `outbox-relay check` process
MAX_LINES = 25

DSN = "postgresql://relay:s3cret-pw@db.example:5432/app"


def _outbox(name: str = "orders", /, **parts: Any) -> dict[str, Any]:
    outbox: dict[str, Any] = {
        "name": name,
        "source": {"type": "postgres-polling", "dsn": DSN},
        "sink": {"type": "stdout"},
    }
    for key, value in parts.items():
        if isinstance(value, dict) and isinstance(outbox.get(key), dict):
            outbox[key] = {**outbox[key], **value}
        else:
            outbox[key] = value
    return outbox


def _config(*outboxes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"outboxes": list(outboxes) or [_outbox()], **top}


SINKS: dict[str, dict[str, Any]] = {
    "stdout": {"type": "stdout"},
    "file": {"type": "file", "path": "/tmp/out.jsonl"},
    "kafka": {"type": "kafka", "bootstrap_servers": "localhost:9092"},
    "rabbitmq": {"type": "rabbitmq", "url": "amqp://guest:guest@localhost:5672/"},
    "nats": {"type": "nats", "servers": ["nats://localhost:4222"]},
    "redis": {"type": "redis", "url": "redis://localhost:6379/0"},
    "webhook": {"type": "webhook", "url": "https://hooks.example/events"},
}
LOGICAL = {"type": "postgres-logical", "dsn": DSN}
# A good config as text, for the cases that add to it or edit it.
GOOD = (
    "outboxes:\n  - name: o\n    source: {type: postgres-polling, dsn: 'host=db'}\n    sink: {type: stdout}\n"
)


@dataclass(frozen=True)
class Case:
    name: str
    #: Writes the bad file (or makes the bad path) in the directory, returns the path to pass.
    make: Callable[[Path], Path]
    #: Texts the refusal must contain: the key, or what is wrong with the file; and the reason.
    expected: tuple[str, ...]


def _yaml(data: Any) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "relay.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def _text(text: str) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "relay.yaml"
        path.write_text(text)
        return path

    return make


def _bytes(data: bytes) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / "relay.yaml"
        path.write_bytes(data)
        return path

    return make


def _laughs(levels: int) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels + 1):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    lines.append(f"outboxes: *l{levels}")
    return "\n".join(lines) + "\n"


def _merge_laughs(levels: int) -> str:
    """Like `_laughs`, each level a mapping that merges the one below ten times (`<<: [...]`)."""
    lines = ["l0: &l0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8, i: 9, j: 10}"]
    for level in range(1, levels + 1):
        keys = ", ".join(f"k{i}: *l{level - 1}" for i in range(10))
        lines.append(f"l{level}: &l{level} {{<<: [*l{level - 1}], {keys}}}")
    return "\n".join(lines) + "\noutboxes: []\n"


def _unknown_keys_file(size: int) -> str:
    good = yaml.safe_dump(_config(), sort_keys=False)
    lines, total, i = [good], len(good), 0
    while total < size:
        line = f"unknown_key_{i:08d}: {i}\n"
        lines.append(line)
        total += len(line)
        i += 1
    return "".join(lines)


class Add(Protocol):
    """Records one case: its name, what makes the bad file, the texts the refusal must contain."""

    def __call__(self, name: str, make: Callable[[Path], Path], *expected: str) -> None: ...


def _unknown_keys(add: Add) -> None:
    # Unknown keys, at every level of the file.
    add("unknown top key", _yaml(_config(outboxs=[])), "outboxs: unknown key")
    add("unknown outbox key", _yaml(_config(_outbox(sinks=[]))), "outboxes[0].sinks: unknown key")
    add(
        "unknown polling key",
        _yaml(_config(_outbox(source={"poll_intervall": "1s"}))),
        "outboxes[0].source.poll_intervall: unknown key",
    )
    add(
        "unknown column key",
        _yaml(_config(_outbox(source={"columns": {"payloads": "body"}}))),
        "outboxes[0].source.columns.payloads: unknown key",
    )
    add(
        "unknown logical key",
        _yaml(_config(_outbox(source={**LOGICAL, "slots": "x"}))),
        "outboxes[0].source.slots: unknown key",
    )
    for section in ("retry", "pipeline", "dead_letter", "lease"):
        add(
            f"unknown {section} key",
            _yaml(_config(_outbox(**{section: {"sometimes": 1}}))),
            f"outboxes[0].{section}.sometimes: unknown key",
        )
    for section in ("http", "log"):
        add(
            f"unknown {section} key",
            _yaml(_config(**{section: {"colour": 1}})),
            f"{section}.colour: unknown key",
        )
    for sink, settings in SINKS.items():
        add(
            f"unknown {sink} sink key",
            _yaml(_config(_outbox(sink={**settings, "compress": True}))),
            "outboxes[0].sink.compress: unknown key",
        )


def _wrong_types_and_values_out_of_range(add: Add) -> None:
    # Wrong types and values out of range.
    add("outboxes a mapping", _yaml({"outboxes": {"name": "x"}}), "outboxes:")
    add("outboxes empty", _yaml({"outboxes": []}), "outboxes: must have at least 1")
    add("top level a list", _yaml([1, 2]), "the top level must be a mapping")
    add("empty file", _text(""), "the file is empty")
    add("batch size text", _yaml(_config(_outbox(source={"batch_size": "many"}))), "source.batch_size:")
    add("batch size list", _yaml(_config(_outbox(source={"batch_size": [1]}))), "source.batch_size:")
    add("port text", _yaml(_config(http={"port": "nine"})), "http.port:")
    add("port too large", _yaml(_config(http={"port": 70000})), "http.port: must be <= 65535")
    add("lease enabled maybe", _yaml(_config(_outbox(lease={"enabled": "maybe"}))), "lease.enabled:")
    add("log level", _yaml(_config(log={"level": "loud"})), "log.level: must be one of")
    add("on_poison", _yaml(_config(_outbox(dead_letter={"on_poison": "explode"}))), "dead_letter.on_poison:")
    add("attempts zero", _yaml(_config(_outbox(dead_letter={"after_attempts": 0}))), "after_attempts")
    add("bad outbox name", _yaml(_config(_outbox("has space"))), "outboxes[0].name: must match")
    add("duplicate key", _text("outboxes: []\noutboxes: []\n"), "duplicate key 'outboxes'")
    add("yaml syntax", _text("outboxes: [\n  - name: {\n"), "invalid YAML")
    add(
        "kafka producer list value",
        _yaml(_config(_outbox(sink={**SINKS["kafka"], "producer": {"linger.ms": [1]}}))),
        "outboxes[0].sink.producer",
    )
    add(
        "key with a line break",
        _text("outboxes: []\n'bad\\nkey': 1\n"),
        "bad\\nkey: unknown key",
    )
    add("very long key", _text("outboxes: []\n? " + "k" * 100_000 + "\n: 1\n"), "kkkkkkkk...: unknown key")


def _durations(add: Add) -> None:
    # Durations.
    for value, shown in (
        (".inf", "not infinity"),
        ("-.inf", "must not be negative"),
        (".nan", "not NaN"),
        ("'-5s'", "is not a duration"),
        ("'5 parsecs'", "is not a duration"),
        ("1" + "0" * 400, "not infinity"),
        ("'99999999h'", "must be at most 7 days"),
        ("true", "must be a duration"),
    ):
        add(
            f"duration {value[:12]}",
            _text(
                "outboxes:\n  - name: o\n"
                f"    source: {{type: postgres-polling, dsn: 'host=db', poll_interval: {value}}}\n"
                "    sink: {type: stdout}\n"
            ),
            "outboxes[0].source.poll_interval: ",
            shown,
        )
    add("retry max below initial", _yaml(_config(_outbox(retry={"initial": "5s", "max": "1s"}))), "retry")
    add(
        "shutdown grace inf",
        _text("outboxes: []\nshutdown_grace: .inf\n"),
        "shutdown_grace: must be a finite",
    )


def _environment_references(add: Add) -> None:
    # Environment references.
    for value in ("${DB", "${}", "${1DB}", "pre${DB", "a${DB:-x"):
        add(
            f"env {value}",
            _yaml(_config(_outbox(source={"table": value}))),
            "outboxes[0].source.table: '${' starts no variable reference",
        )
    add(
        "env unset",
        _yaml(_config(_outbox(source={"dsn": "${OUTBOX_RELAY_FUZZ_UNSET}"}))),
        "outboxes[0].source.dsn: environment variable OUTBOX_RELAY_FUZZ_UNSET is not set",
    )


def _urls_dsns_servers_and_names(add: Add) -> None:
    # URLs, DSNs, servers, names.
    for dsn in ("not a dsn", "host=db port", "postgresql://db:notaport/x", "host=db port=70000"):
        add(f"dsn {dsn}", _yaml(_config(_outbox(source={"dsn": dsn}))), "outboxes[0].source.dsn: ")
    for servers in (
        "localhost:notaport",
        "localhost:9092,,localhost:9093",
        "localhost:99999",
        "a b:1",
        "gopher://h:1",
    ):
        add(
            f"kafka bootstrap {servers}",
            _yaml(_config(_outbox(sink={**SINKS["kafka"], "bootstrap_servers": servers}))),
            "outboxes[0].sink.bootstrap_servers:",
        )
    for producer, key in (
        ({"no.such.setting": 1}, "producer.no.such.setting"),
        ({"linger.ms": "abc"}, "producer.linger.ms"),
        ({"enable.idempotence": "maybe"}, "producer.enable.idempotence"),
        ({"compression.type": "zzz"}, "producer.compression.type"),
        ({"security.protocol": "nope", "sasl.password": "hunter2"}, "producer.security.protocol"),
    ):
        add(
            f"kafka producer {next(iter(producer))}",
            _yaml(_config(_outbox(sink={**SINKS["kafka"], "producer": producer}))),
            f"outboxes[0].sink.{key}: librdkafka refuses",
        )
    for sink, key, address in (
        ("rabbitmq", "url", "http://guest:guest@localhost/"),
        ("rabbitmq", "url", "amqp://"),
        ("nats", "servers", ["nats://localhost:port"]),
        ("nats", "servers", ["ftp://localhost:4222"]),
        ("redis", "url", "ftp://localhost"),
        ("webhook", "url", "ftp://hooks.example"),
        ("webhook", "url", "https://"),
    ):
        add(
            f"{sink} {key} {address}",
            _yaml(_config(_outbox(sink={**SINKS[sink], key: address}))),
            f"outboxes[0].sink.{key}:",
        )
    add(
        "table three parts", _yaml(_config(_outbox(source={"table": "a.b.c"}))), "source.table: has more than"
    )
    add(
        "table open quote",
        _yaml(_config(_outbox(source={"table": '"outbox'}))),
        "source.table: has an unbalanced",
    )


def _two_outboxes_reading_one_source(add: Add) -> None:
    # Two outboxes that read one table, slot or publication.
    for first, second in (
        ("outbox", "PUBLIC.OUTBOX"),
        ('"outbox"', "public.outbox"),
        ("public.outbox", "outbox"),
    ):
        add(
            f"one table as {first} and {second}",
            _yaml(_config(_outbox("a", source={"table": first}), _outbox("b", source={"table": second}))),
            "outboxes[1].source.table: table",
        )
    add(
        "polled and replicated table",
        _yaml(_config(_outbox("a"), _outbox("b", source={**LOGICAL, "tables": ["Public.Outbox"]}))),
        "outboxes[1].source.tables[0]: table public.outbox is also read by outbox 'a'",
    )
    add(
        "one slot",
        _yaml(
            _config(
                _outbox("a", source={**LOGICAL, "publication": "p1", "tables": ["t1"]}),
                _outbox("b", source={**LOGICAL, "publication": "p2", "tables": ["t2"]}),
            )
        ),
        "outboxes[1].source.slot: replication slot outbox_relay is also read by outbox 'a'",
    )
    add(
        "one publication",
        _yaml(
            _config(
                _outbox("a", source={**LOGICAL, "slot": "s1", "mode": "message"}),
                _outbox("b", source={**LOGICAL, "slot": "s2", "mode": "message"}),
            )
        ),
        "outboxes[1].source.publication: publication outbox_relay is also read by outbox 'a'",
    )


def _bombs_huge_and_binary_files(add: Add) -> None:
    # Bombs, huge and binary files.
    add("nested 500 deep", _text("outboxes: " + "[" * 500 + "]" * 500 + "\n"), "nested more than")
    add(
        "mappings 40 deep",
        _text("outboxes:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 41))),
        "nested more",
    )
    add("billion laughs 9 levels", _text(_laughs(9)), "values once its aliases are expanded")
    add("laughs 5 levels", _text(_laughs(5)), "values once its aliases are expanded")
    add("alias inside itself", _text("a: &a [1, *a]\noutboxes: *a\n"), "alias *a is inside the node")
    add("10 MB of unknown keys", _text(_unknown_keys_file(10 * 1024 * 1024)), "larger than 1024 KiB")
    add(
        "900 KB of unknown keys",
        _text(_unknown_keys_file(900 * 1024)),
        "values once its aliases are expanded",
    )
    add("9,000 unknown keys", _text(_unknown_keys_file(9_000 * 24)), ": unknown key", "more problems")
    add("one 1000 KB string", _text('outboxes: "' + "x" * 1_000_000 + '"\n'), "outboxes: ")
    add("binary file", _bytes(bytes(range(256)) * 64), "binary (it contains NUL bytes)")
    add("latin-1 file", _bytes("outboxes: []\nname: café\n".encode("latin-1")), "not UTF-8 text")
    add("control characters", _bytes(b"outboxes: [\x07]\n"), "invalid YAML")


def _keys_not_text_and_values_not_built(add: Add) -> None:
    # Keys that are not text, values the YAML constructor cannot build.
    add(
        "list as key",
        _text(GOOD + "? [a, b]\n: 1\n"),
        "relay.yaml:5:3: (top): a key must be text, not a list",
    )
    add(
        "mapping as key",
        _text(GOOD + "? {a: 1}\n: 1\n"),
        "relay.yaml:5:3: (top): a key must be text, not a mapping",
    )
    add(
        "mapping as nested key",
        _text(GOOD + "http: {? {a: 1}\n: 1}\n"),
        "relay.yaml:5:10: http: a key must be text, not a mapping",
    )
    add(
        "list as key in a list item",
        _text("outboxes:\n  - name: o\n    ? [x]\n    : 1\n"),
        "outboxes[0]: a key must be text, not a list",
    )
    add("boolean key", _text(GOOD + "true: 1\n"), "(top): key true is a boolean, not text (quote it")
    add("number key", _text(GOOD + "http: {8080: 1}\n"), "http: key 8080 is a number, not text (quote it")
    add("null key", _text(GOOD + "~: 1\n"), "(top): key ~ is null, not text")
    add(
        "lone surrogate key", _text(GOOD + '"a\\udc80": 1\n'), "(top): key a\\udc80: contains \\udc80, a lone"
    )
    add(
        "lone surrogate value",
        _text(GOOD.replace("{type: stdout}", '{type: file, path: "/tmp/\\ud800"}')),
        "outboxes[0].sink.path: contains \\ud800, a lone surrogate",
    )
    add(
        "integer of 4301 digits",
        _text(GOOD + "x: 1" + "0" * 4300 + "\n"),
        "relay.yaml:5:4: invalid YAML",
        "4300",
    )
    add("month 13", _text(GOOD + "x: 2001-13-01\n"), "relay.yaml:5:4: invalid YAML")


def _nested_environment_references(add: Add) -> None:
    # Nested environment references (a default cannot hold a reference).
    for value in ("${OUTBOX_RELAY_FUZZ_UNSET:-${HOME}}", "${HOME:-${HOME}}", "${HOME:-a$${b}"):
        add(
            f"env nested {value[:12]}",
            _yaml(_config(_outbox(source={"table": value}))),
            "outboxes[0].source.table: a default value cannot contain '${'",
        )


def _numbers_that_overflow_or_spin(add: Add) -> None:
    # Numbers that overflow or spin.
    add(
        "multiplier 1e200",
        _text(GOOD.replace("sink:", "retry: {multiplier: 1e200}\n    sink:")),
        "retry.multiplier: must be <= 10",
    )
    for section, key, huge in (
        ("pipeline", "max_in_flight", 10**30),
        ("pipeline", "publish_batch_size", 10**12),
        ("pipeline", "per_aggregate_in_flight", 10**12),
        ("dead_letter", "after_attempts", 10**30),
    ):
        add(f"{key} huge", _yaml(_config(_outbox(**{section: {key: huge}}))), f"{section}.{key}: must be <=")
    add(
        "redis maxlen huge",
        _yaml(_config(_outbox(sink={**SINKS["redis"], "maxlen": 10**30}))),
        "sink.maxlen: must be <=",
    )
    for section, key, shown in (
        ("source", "poll_interval", "0.01"),
        ("lease", "check_interval", "0.1"),
        ("pipeline", "stats_interval", "0.1"),
    ):
        add(
            f"{key} tiny",
            _yaml(_config(_outbox(**{section: {key: "0.001ms"}}))),
            f"{section}.{key}: must be >= {shown}",
        )
    for key, shown in (("poll_interval", "0.01"), ("status_interval", "0.1"), ("heartbeat_interval", "0.1")):
        add(
            f"logical {key} tiny",
            _yaml(_config(_outbox(source={**LOGICAL, key: "0.001ms"}))),
            f"outboxes[0].source.{key}: must be ",
            shown,
        )
    add(
        "nats reconnect_wait tiny",
        _yaml(_config(_outbox(sink={**SINKS["nats"], "reconnect_wait": "0.001ms"}))),
        "sink.reconnect_wait: must be >= 0.01",
    )


def _sink_settings_every_event_would_fail_on(add: Add) -> None:
    # Sink settings every event would fail on.
    for value in ("café", "a\u2028b", "\x7f"):
        add(
            f"webhook header value {value!r}",
            _yaml(_config(_outbox(sink={**SINKS["webhook"], "headers": {"X-Name": value}}))),
            "outboxes[0].sink.headers: header X-Name has a character HTTP headers cannot carry",
        )
    for topic in (".", "..", "t" * 250, "{aggregate_type}" + "t" * 250):
        add(
            f"kafka topic {topic[:20]}",
            _yaml(_config(_outbox(sink={**SINKS["kafka"], "topic": topic}))),
            "outboxes[0].sink.topic: ",
            "Kafka",
        )
    add(
        "nats subject outside the stream subjects",
        _yaml(
            _config(
                _outbox(
                    sink={**SINKS["nats"], "subject": "adv.cfg.{aggregate_type}", "subjects": ["other.>"]}
                )
            )
        ),
        "outboxes[0].sink.subjects: no subject in it covers 'adv.cfg.",
    )
    add(
        "nats static subject outside the stream subjects",
        _yaml(_config(_outbox(sink={**SINKS["nats"], "subject": "a.b", "subjects": ["a.c", "a.b.>", "a"]}))),
        "outboxes[0].sink.subjects: no subject in it covers 'a.b'",
    )
    add(
        "file path a directory",
        _yaml(_config(_outbox(sink={"type": "file", "path": "/tmp"}))),
        "outboxes[0].sink.path: /tmp is a directory",
    )


def _sink_settings_run_would_mishandle(add: Add) -> None:
    # Sink settings that `run` would loop on or mishandle.
    for template in ("{aggregate_type}", "x{aggregate_type}", "{aggregate_type}.{event_type}"):
        add(
            f"nats declared stream on a wildcard from {template}",
            _yaml(_config(_outbox(sink={**SINKS["nats"], "subject": template}))),
            "outboxes[0].sink.subject: the stream would be created on ",
            "literal first word",
        )
    add(
        "nats declared stream subjects starting with a wildcard",
        _yaml(
            _config(_outbox(sink={**SINKS["nats"], "subject": "a.{event_type}", "subjects": ["a.>", "*"]}))
        ),
        "outboxes[0].sink.subjects: ",
        "starts with a wildcard",
    )
    for template, reason in (
        ("a..{aggregate_type}", "empty word"),
        ("a.{aggregate_type}.", "empty word"),
        ("$JS.{aggregate_type}", "starts with '$'"),
        ("$SYS.x", "starts with '$'"),
    ):
        add(
            f"nats subject {template}",
            _yaml(_config(_outbox(sink={**SINKS["nats"], "subject": template}))),
            "outboxes[0].sink.subject: ",
            reason,
        )
    for subjects, reason in (
        (["a.>", "a..b"], "subjects[1]: stream subject 'a..b' has an empty word"),
        (["a.>", "$JS.API.>"], "subjects[1]: stream subject '$JS.API.>' starts with '$'"),
        (["a.>", "a b"], "subjects[1]: stream subject 'a b' contains whitespace"),
        (["a.>", "a.>"], "'a.>' is listed twice (subjects[0] and subjects[1])"),
        (["a.*", "a.>"], "subjects[0] 'a.*' and subjects[1] 'a.>' overlap"),
    ):
        add(
            f"nats subjects {subjects}",
            _yaml(
                _config(_outbox(sink={**SINKS["nats"], "subject": "a.{event_type}", "subjects": subjects}))
            ),
            "outboxes[0].sink.subjects: ",
            reason,
        )
    for url, reason in (
        ("redis://localhost:6379/0?socket_timeout=abc", "socket_timeout"),
        ("redis://localhost:6379/0?db=5x", "'db'"),
        ("redis://localhost:6379/abc", "the database in the path must be a number"),
        ("redis://localhost:6379/5x", "the database in the path must be a number"),
        ("redis://localhost:6379/0?protocol=9", "protocol must be 2 or 3"),
        ("unix://", "names no socket path"),
        ("redis://relay:s3cret-pw@localhost:6379/abc", "the database in the path must be a number"),
    ):
        add(
            f"redis url {url}",
            _yaml(_config(_outbox(sink={**SINKS["redis"], "url": url}))),
            "outboxes[0].sink.url: ",
            reason,
        )
    add(
        "rabbitmq url channel_max=abc",
        _yaml(
            _config(
                _outbox(
                    sink={**SINKS["rabbitmq"], "url": "amqp://relay:s3cret-pw@localhost/?channel_max=abc"}
                )
            )
        ),
        "outboxes[0].sink.url: pika refuses url",
        "channel_max",
    )
    add(
        "rabbitmq exchange amq.events",
        _yaml(_config(_outbox(sink={**SINKS["rabbitmq"], "exchange": "amq.events"}))),
        "outboxes[0].sink.exchange: exchange 'amq.events' starts with 'amq.'",
    )
    for url, reason in (
        ("https://hooks.example:0/events", "port 0"),
        ("https://hooks example/events", "the host contains whitespace"),
    ):
        add(
            f"webhook url {url}",
            _yaml(_config(_outbox(sink={**SINKS["webhook"], "url": url}))),
            "outboxes[0].sink.url: ",
            reason,
        )
    add(
        "webhook headers differing in case",
        _yaml(
            _config(
                _outbox(sink={**SINKS["webhook"], "headers": {"authorization": "a", "Authorization": "b"}})
            )
        ),
        "outboxes[0].sink.headers: headers authorization and Authorization are one header",
    )
    add(
        "file sink path a FIFO",
        _sink_path(_make_fifo),
        "outboxes[0].sink.path: ",
        "is a FIFO, not a regular file",
    )
    add(
        "file sink path a socket",
        _sink_path(_make_socket),
        "outboxes[0].sink.path: ",
        "is a socket, not a regular file",
    )
    add(
        "file sink path a device",
        _yaml(_config(_outbox(sink={"type": "file", "path": "/dev/zero"}))),
        "outboxes[0].sink.path: /dev/zero is a character device, not a regular file",
    )


def _one_table_behind_two_spellings_of_a_dsn(add: Add) -> None:
    # Two outboxes on one table, the port written differently or left out.
    for first, second in (
        ("host=db port=05432 dbname=app", "host=db port=5432 dbname=app"),
        ("host=db dbname=app", "postgresql://db:5432/app"),
        ("postgresql://db:05432/app", "host=db dbname=app"),
    ):
        add(
            f"one table at {first} and {second}",
            _yaml(
                _config(
                    _outbox("a", source={"dsn": first, "table": "t"}),
                    _outbox("b", source={"dsn": second, "table": "t"}),
                )
            ),
            "outboxes[1].source.table: table t is also read by outbox 'a'",
        )


def _logical_source_settings_that_would_be_ignored(add: Add) -> None:
    # Logical source settings that would be ignored.
    add(
        "logical message mode with tables",
        _yaml(_config(_outbox(source={**LOGICAL, "mode": "message", "tables": ["t"]}))),
        "outboxes[0].source.tables: ",
        "message",
    )
    add(
        "logical message mode with columns",
        _yaml(_config(_outbox(source={**LOGICAL, "mode": "message", "columns": {"payload": "body"}}))),
        "outboxes[0].source.columns: ",
        "message",
    )
    add(
        "one table twice in tables",
        _yaml(_config(_outbox(source={**LOGICAL, "tables": ["public.t", "PUBLIC.T"]}))),
        "outboxes[0].source.tables: table public.t is listed twice (tables[0] and tables[1])",
    )


def _dsns_libpq_would_misread_or_refuse(add: Add) -> None:
    # An empty DSN: libpq would connect to its defaults (a local socket, another database).
    for number, (where, parts) in enumerate(
        (
            ("source", {"source": {"dsn": ""}}),
            ("source", {"source": {"dsn": "  \t "}}),
            ("source", {"source": {"dsn": "${OUTBOX_RELAY_FUZZ_NEVER_SET:-}"}}),
            ("source", {"source": {**LOGICAL, "dsn": ""}}),
            ("dead_letter", {"dead_letter": {"dsn": ""}}),
        )
    ):
        add(
            f"empty dsn {number} in {where}",
            _yaml(_config(_outbox(**parts))),
            f"outboxes[0].{where}.dsn: is empty",
        )
    # DSN settings libpq refuses when it connects: refused offline, by name.
    for setting, shown in (
        ("sslmode=bogus", "sslmode"),
        ("target_session_attrs=bogus", "target_session_attrs"),
        ("channel_binding=x", "channel_binding"),
        ("gssencmode=bogus", "gssencmode"),
        ("load_balance_hosts=bogus", "load_balance_hosts"),
        ("host=a,b port=1,2,3", "3 ports for 2 hosts"),
    ):
        add(
            f"dsn {setting}",
            _yaml(_config(_outbox(source={"dsn": f"dbname=app password=s3cret-pw {setting}"}))),
            "outboxes[0].source.dsn: ",
            shown,
        )
    add(
        "dsn URL sslmode=bogus",
        _yaml(_config(_outbox(dead_letter={"dsn": "postgresql://u:s3cret-pw@h/db?sslmode=bogus"}))),
        "outboxes[0].dead_letter.dsn: ",
        "sslmode",
    )


def _merge_key_bombs(add: Add) -> None:
    # Merge keys are expanded like aliases: they count towards the same limit.
    add("billion laughs through merge keys", _text(_merge_laughs(9)), "aliases are expanded")


def _paths_that_are_not_a_readable_file(add: Add) -> None:
    # Paths that are not a readable file.
    add("directory", lambda d: d, "directory")
    add("missing file", lambda d: d / "missing.yaml", "No such file or directory")
    add("path below a file", lambda d: _text("x")(d) / "below.yaml", "Not a directory")
    add("dangling symlink", lambda d: _symlink(d / "dangling.yaml", d / "nowhere"), "No such file")
    add("symlink loop", lambda d: _symlink(d / "loop.yaml", d / "loop.yaml"), "symbolic links")
    add("name too long", lambda d: d / ("x" * 300 + ".yaml"), "File name too long")
    add("fifo", _fifo, "is a FIFO, not a regular file")
    add("socket", _socket, "is a socket, not a regular file")
    add("char device", lambda d: Path("/dev/zero"), "/dev/zero: is a character device, not a regular file")


# Every kind of bad config, in the order the cases run.
_SECTIONS: tuple[Callable[[Add], None], ...] = (
    _unknown_keys,
    _wrong_types_and_values_out_of_range,
    _durations,
    _environment_references,
    _urls_dsns_servers_and_names,
    _two_outboxes_reading_one_source,
    _bombs_huge_and_binary_files,
    _keys_not_text_and_values_not_built,
    _nested_environment_references,
    _numbers_that_overflow_or_spin,
    _sink_settings_every_event_would_fail_on,
    _sink_settings_run_would_mishandle,
    _one_table_behind_two_spellings_of_a_dsn,
    _logical_source_settings_that_would_be_ignored,
    _dsns_libpq_would_misread_or_refuse,
    _merge_key_bombs,
    _paths_that_are_not_a_readable_file,
)


def _cases() -> list[Case]:
    cases: list[Case] = []

    def add(name: str, make: Callable[[Path], Path], *expected: str) -> None:
        cases.append(Case(name, make, expected))

    for section in _SECTIONS:
        section(add)
    return cases


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))


def _sink_path(make_path: Callable[[Path], None]) -> Callable[[Path], Path]:
    """A config whose file sink appends to a path that `make_path` creates (not a regular file)."""

    def make(directory: Path) -> Path:
        target = directory / "events"
        make_path(target)
        return _yaml(_config(_outbox(sink={"type": "file", "path": str(target)})))(directory)

    return make


def _fifo(directory: Path) -> Path:
    path = directory / "relay.yaml"
    os.mkfifo(path)
    return path


def _socket(directory: Path) -> Path:
    path = directory / "relay.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
    return path


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


CASES = _cases()


def test_the_fuzz_covers_at_least_sixty_bad_configs() -> None:
    assert len(CASES) >= 60, len(CASES)
    assert len({case.name for case in CASES}) == len(CASES)


class Hung(BaseException):
    """Raised in the test by SIGALRM: `check` or `run` did not return."""


def _hung(signum: int, frame: Any) -> None:
    raise Hung(f"did not return within {TIME_BOUND_S * 3} s")


def _assert_refused(case: Case, code: int, output: str, seconds: float) -> None:
    lines = output.splitlines()
    assert code == 2, (case.name, code, output[:2000])
    assert "Traceback" not in output, (case.name, output[:3000])
    for expected in case.expected:
        assert expected in output, (case.name, expected, output[:2000])
    assert 1 <= len(lines) <= MAX_LINES, (case.name, len(lines), output[:2000])
    assert seconds < TIME_BOUND_S, (case.name, seconds)
    for secret in ("s3cret-pw", "hunter2"):
        assert secret not in output, (case.name, output[:2000])


@pytest.mark.parametrize("command", ["check", "run"])
def test_every_generated_bad_config_is_refused_with_exit_2_naming_the_key_quickly_and_in_bounded_memory(
    tmp_path: Path, command: str
) -> None:
    runner = CliRunner()
    for index, case in enumerate(CASES):
        directory = tmp_path / f"case-{index}"
        directory.mkdir()
        path = case.make(directory)
        # tracemalloc slows Python down a few times: the big files are measured as processes.
        traced = case.name not in PROCESS_CASES
        if traced:
            tracemalloc.start()
        started = time.monotonic()
        signal.signal(signal.SIGALRM, _hung)
        signal.setitimer(signal.ITIMER_REAL, TIME_BOUND_S * 3)
        try:
            result = runner.invoke(cli, [command, "-c", str(path)])
            seconds = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory() if traced else (0, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            tracemalloc.stop()
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            case.name,
            repr(result.exception),
        )
        _assert_refused(case, result.exit_code, result.output, seconds)
        assert peak < PYTHON_MEMORY_BOUND, (case.name, peak)


#: The ones that run as real processes: the bombs and huge files (memory measured by the kernel).
PROCESS_CASES = [
    "nested 500 deep",
    "billion laughs 9 levels",
    "10 MB of unknown keys",
    "900 KB of unknown keys",
    "9,000 unknown keys",
    "one 1000 KB string",
    "binary file",
    "directory",
    "fifo",
    "kafka producer no.such.setting",
    "one table as outbox and PUBLIC.OUTBOX",
]


# Runs argv[2:], passes its exit status on, and writes its peak resident memory (KiB) to argv[1].
_MEASURED = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]);"
    " open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss));"
    " sys.exit(code)"
)


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_a_bad_config_stops_the_outbox_relay_process_with_exit_2_in_bounded_time_and_memory(
    tmp_path: Path, name: str
) -> None:
    (case,) = [c for c in CASES if c.name == name]
    path = case.make(tmp_path)
    started = time.monotonic()
    rss_file = tmp_path / "maxrss"
    # The peak is measured by a small parent of the relay's process: a child forked from this
    # test process inherits its memory high-water mark (Linux keeps it across exec), which
    # would measure pytest, not the relay.
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _MEASURED,
            str(rss_file),
            sys.executable,
            "-m",
            "outbox_relay",
            "check",
            "-c",
            str(path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    killer = threading.Timer(TIME_BOUND_S * 3, process.kill)
    killer.start()
    try:
        assert process.stdout is not None
        output = process.stdout.read()
        process.wait()
    finally:
        killer.cancel()
        if process.stdout is not None:
            process.stdout.close()
    seconds = time.monotonic() - started
    maxrss_kb = int(rss_file.read_text())
    _assert_refused(case, process.returncode, output.decode("utf-8", "replace"), seconds)
    assert maxrss_kb < PROCESS_MEMORY_BOUND_KB, (name, maxrss_kb)


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_empty_config_path_is_refused_as_no_config_file_given(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "-c", ""])
    assert result.exit_code == 2, result.output
    assert "no config file given" in result.output, result.output
    assert "directory" not in result.output


def test_a_good_config_still_passes_check(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    sinks = [
        _outbox(f"o{i}", source={"table": f"t{i}"}, sink=settings)
        for i, settings in enumerate(SINKS.values())
    ]
    path.write_text(yaml.safe_dump(_config(*sinks), sort_keys=False))
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.rstrip().endswith(": ok")


def test_an_alias_that_repeats_a_small_mapping_is_still_accepted(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "outboxes:\n"
        "  - name: a\n"
        "    source: &src {type: postgres-polling, dsn: 'host=db dbname=app', table: a}\n"
        "    sink: &sink {type: stdout}\n"
        "    retry: &retry {initial: 1s, max: 10s}\n"
        "  - name: b\n"
        "    source: {type: postgres-polling, dsn: 'host=db dbname=app', table: b}\n"
        "    sink: *sink\n"
        "    retry: *retry\n"
    )
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output


def test_a_literal_dollar_brace_is_written_with_two_dollars(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "outboxes:\n  - name: a\n"
        "    source: {type: postgres-polling, dsn: 'host=db password=a$${b'}\n"
        "    sink: {type: stdout}\n"
    )
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "a${b" not in result.output  # (a password: masked)


def test_more_problems_than_fit_are_counted_not_printed(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(_unknown_keys_file(4_000))
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    lines = result.output.splitlines()
    assert result.exit_code == 2
    assert len(lines) == 21, lines
    assert lines[0] == f"{path}: unknown_key_00000000: unknown key"
    assert lines[-1].startswith("... and ")
    assert lines[-1].endswith(" more problems")
    assert int(lines[-1].split()[2]) > 100


def test_a_mapping_merged_in_with_a_merge_key_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "outboxes:\n"
        "  - name: a\n"
        "    source: &a {type: postgres-polling, dsn: 'host=db dbname=app', batch_size: 50, table: a}\n"
        "    sink: {type: stdout}\n"
        "  - name: b\n"
        "    source:\n"
        "      <<: *a\n"
        "      table: b\n"
        "      batch_size: 7\n"
        "    sink: {type: stdout}\n"
    )
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["outbox a"]["source"]["batch_size"] == 50
    assert shown["outbox b"]["source"]["batch_size"] == 7  # (a key written beside it wins)
    assert shown["outbox b"]["source"]["table"] == "b"


@pytest.mark.parametrize(
    "producer",
    [{"linger.ms": -5}, {"batch.size": 0}, {"enable.idempotence": False, "max.in.flight": 1_000_001}],
)
def test_a_client_library_refusal_with_a_line_break_is_printed_as_one_line(
    tmp_path: Path, producer: dict[str, Any]
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(_config(_outbox(sink={**SINKS["kafka"], "producer": producer}))))
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 2, result.output
    (line,) = result.output.splitlines()
    assert line.startswith(f"{path}: outboxes[0].sink.producer"), line
    assert "librdkafka refuses" in line, line
    assert line.endswith(" (_INVALID_ARG)"), line


def test_check_masks_the_kafka_oauth_extensions_client_secret_and_key_passwords(tmp_path: Path) -> None:
    secrets = {
        "sasl.oauthbearer.extensions": "logicalCluster=lkc-x1,identityPoolId=pool-ext-s3cret",
        "sasl.oauthbearer.client.secret": "client-s3cret-value",
        "ssl.keystore.password": "keystore-s3cret-value",
        "ssl.key.password": "key-s3cret-value",
    }
    producer = {
        "security.protocol": "sasl_ssl",
        "sasl.mechanisms": "OAUTHBEARER",
        "sasl.oauthbearer.method": "oidc",
        "sasl.oauthbearer.client.id": "relay",
        "sasl.oauthbearer.token.endpoint.url": "https://auth.example/token",
        **secrets,
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(_config(_outbox(sink={**SINKS["kafka"], "producer": producer}))))
    result = CliRunner().invoke(cli, ["check", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "sasl.oauthbearer.client.id: relay" in result.output  # (settings are shown)
    for key, value in secrets.items():
        assert value not in result.output, (key, result.output)
        assert "pool-ext" not in result.output
