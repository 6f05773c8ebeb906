"""Throughput before and after a change: the relay of a base commit against the current code, in
one run. Prints figures and ratios; asserts nothing about timing (only that every event arrived
and that each relay ran the code it was meant to).

The base commit's code comes from `git archive`, installed with `pip install --no-deps --target`
into a temporary folder (this venv has every dependency); the current code is the one this venv
has installed (this checkout, uncommitted changes included). Each relay is a process of its own,
the package's CLI (`python -m relay`, or `python -m outbox_relay` after the rename) with
`run --drain`, started through tests/bench/version_child.py outside the checkout, with PYTHONPATH
naming the base's folder for the base only; the child checks afterwards that every module of the
relay it loaded came from its version's folders and none from the other version's.

For each run (a source -> a sink), against one private PostgreSQL (wal_level=logical) and, for
kafka, the broker of tests/harness/kafka.py (a private tansu, or KAFKA_BOOTSTRAP_SERVERS), rounds
alternate base, current, base, current, ...; each drains the same freshly written backlog of N
events (1,000 aggregates, 20 transactions; for the logical source a new slot created before the
writes). Figures per drain are those of tests.bench.bench_logical.drain: events/s between
"outbox started" and "drained" in the relay's own log; events per CPU-second the relay process
used in that span (sampled from /proc: far less disturbed than the elapsed time when other work
shares the cores, but blind to time spent waiting on the database or broker); peak RSS. Printed
per run: every round, then per version the median, min and max of both rates, and for each the
ratio current/base of the medians and the median of the per-round ratios (each current drain
against the base drain just before it). `--base HEAD` runs the same code on both sides: the
spread of its ratios around 1 is what the machine's noise alone gives.

    python -m tests.bench.bench_versions [--base 276f62b] [--events 100000] [--rounds 5]
        [--sources polling,logical] [--sinks file,kafka]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import outbox_relay
import outbox_relay.connectors
from tests.bench.bench_logical import _prepare, _source, drain
from tests.bench.child_process import RelayCommand
from tests.bench.version_child import Spec
from tests.harness.postgres import start_postgres
from tests.support import REPO, create_outbox_database

CHILD = Path(__file__).with_name("version_child.py")
#: The source kinds of tests.bench.bench_logical by the names this benchmark takes.
SOURCES = {"polling": "polling", "logical": "table"}
SINKS = ("file", "kafka")
TRANSACTIONS = 20
PARTITIONS = 4
#: The file sink's output, in the benchmark's directory, deleted before every drain.
FILE_OUT = "out.jsonl"
#: Top-level import names of the code before and after the package rename.
LAYOUTS = (("relay", "connectors"), ("outbox_relay",))
#: The figures of tests.bench.bench_logical.drain compared between the versions.
RATES = ("events_per_s", "events_per_cpu_s")


@dataclass(frozen=True)
class Version:
    """One version of the relay's code and how to start it so that it runs that code only."""

    label: str
    spec: Spec
    pythonpath: str | None

    def command(self, directory: Path) -> RelayCommand:
        env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
        if self.pythonpath is not None:
            env["PYTHONPATH"] = self.pythonpath
        # Started in `directory`, outside the checkout: a `relay/` folder in the working
        # directory could be imported instead of the base version's package.
        return RelayCommand(argv=(sys.executable, str(CHILD), json.dumps(self.spec)), env=env, cwd=directory)

    def imported(self) -> str:
        """Where the last drain imported the package it ran from, as the child reported it."""
        files: dict[str, str] = json.loads(Path(self.spec["report"]).read_text())
        return f"{self.spec['run']} from {files[self.spec['run']]} ({len(files)} modules checked)"


@dataclass
class Rounds:
    """The drains of one run, per version label, in the order they ran."""

    drains: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def figures(self, label: str, figure: str) -> list[float]:
        return [d[figure] for d in self.drains[label]]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def _spec(names: tuple[str, ...], roots: list[Path], report: Path) -> Spec:
    theirs = [name for layout in LAYOUTS if layout != names for name in layout]
    return Spec(
        run=names[0], ours=list(names), roots=[str(r) for r in roots], theirs=theirs, report=str(report)
    )


def install_base(ref: str, directory: Path) -> Version:
    """The code of commit `ref`, from `git archive`, pip-installed without dependencies into a
    folder of `directory`."""
    commit = _git("rev-parse", "--short", "--verify", f"{ref}^{{commit}}")
    source, site = directory / "base-source", directory / "base-site"
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(source, filter="data")
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(source)],
        check=True,
    )
    print(f"installed {commit} into {site} in {time.perf_counter() - started:.0f} s", flush=True)
    names = LAYOUTS[1] if (site / "outbox_relay").is_dir() else LAYOUTS[0]
    spec = _spec(names, [site], directory / "base-imports.json")
    return Version(f"base {commit}", spec, str(site))


def current_version(directory: Path) -> Version:
    """The code this venv has installed as outbox_relay (for an editable install, the checkout)."""
    roots = [Path(outbox_relay.__file__).parent, Path(outbox_relay.connectors.__file__).parent]
    spec = _spec(LAYOUTS[1], roots, directory / "current-imports.json")
    return Version(f"current {_git('describe', '--always', '--dirty')}", spec, None)


def _sinks(names: list[str], directory: Path, stack: ExitStack) -> dict[str, dict[str, Any]]:
    sinks: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "file":
            sinks[name] = {"type": "file", "path": str(directory / FILE_OUT)}
        elif name == "kafka":
            from tests.harness.kafka import create_topic, start_kafka

            broker = stack.enter_context(start_kafka())
            topic = f"bench-versions-{uuid.uuid4().hex[:8]}"
            create_topic(broker.bootstrap_servers, topic, PARTITIONS)
            sinks[name] = {"type": "kafka", "bootstrap_servers": broker.bootstrap_servers, "topic": topic}
    return sinks


def run_rounds(
    dsn: str,
    directory: Path,
    run: tuple[str, str, dict[str, Any]],
    versions: list[Version],
    args: argparse.Namespace,
) -> Rounds:
    """`args.rounds` rounds of one run, each round one drain per version in turn, each drain of a
    backlog of `args.events` written just before it."""
    label, source, sink = run
    rounds = Rounds({version.label: [] for version in versions})
    for round_ in range(1, args.rounds + 1):
        for version in versions:
            _prepare(dsn, SOURCES[source], args.events, TRANSACTIONS)
            (directory / FILE_OUT).unlink(missing_ok=True)
            figures = drain(
                directory, _source(dsn, SOURCES[source]), sink, args.events, version.command(directory)
            )
            rounds.drains[version.label].append(figures)
            print(
                f"{label:18} round {round_}  {version.label:28} {figures['events_per_s']:9,.0f} events/s"
                f" {figures['seconds']:6.2f} s, {figures['events_per_cpu_s']:9,.0f} events/CPU-s"
                f" {figures['cpu_s']:6.2f} CPU-s, peak RSS {figures['rss_mb']:5.1f} MB",
                flush=True,
            )
    return rounds


def _ratios(rounds: Rounds, versions: list[Version], figure: str) -> str:
    """current/base of the medians of `figure`, and the median of the per-round ratios."""
    base, current = (rounds.figures(version.label, figure) for version in versions)
    paired = statistics.median(c / b for b, c in zip(base, current, strict=True))
    return f"{statistics.median(current) / statistics.median(base):10.3f} (per round {paired:5.3f})".ljust(29)


def summary(label: str, rounds: Rounds, versions: list[Version]) -> list[str]:
    """The lines printed for one run: per version the median, min and max of events/s and of
    events per CPU-second of the relay, the median peak RSS; then the ratios current/base."""
    lines = []
    for version in versions:
        columns = []
        for figure in RATES:
            values = rounds.figures(version.label, figure)
            columns += [f"{statistics.median(values):10,.0f}", f"{min(values):9,.0f}", f"{max(values):9,.0f}"]
        rss = statistics.median(rounds.figures(version.label, "rss_mb"))
        lines.append(f"{label:18} {version.label:28} {' '.join(columns)} {rss:8.1f}")
    ratios = " ".join(_ratios(rounds, versions, figure) for figure in RATES)
    lines.append(f"{label:18} {'current/base':28} {ratios}".rstrip())
    return lines


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="276f62b", help="the commit to compare against")
    parser.add_argument("--events", type=int, default=100_000, help="backlog drained in every round")
    parser.add_argument("--rounds", type=int, default=5, help="of each version, alternating")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"subset of {', '.join(SOURCES)}")
    parser.add_argument("--sinks", default=",".join(SINKS), help=f"subset of {', '.join(SINKS)}")
    args = parser.parse_args(argv)
    args.sources = [s for s in args.sources.split(",") if s]
    args.sinks = [s for s in args.sinks.split(",") if s]
    unknown = (set(args.sources) - set(SOURCES)) | (set(args.sinks) - set(SINKS))
    if unknown:
        parser.error(f"unknown sources or sinks: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    results: list[str] = []
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-versions-")))
        versions = [install_base(args.base, directory), current_version(directory)]
        dsn = create_outbox_database(stack.enter_context(start_postgres()))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE PUBLICATION bench FOR TABLE outbox WITH (publish = 'insert')")
        sinks = _sinks(args.sinks, directory, stack)
        for source in args.sources:
            for sink_name, sink in sinks.items():
                label = f"{source} -> {sink_name}"
                results += summary(
                    label, run_rounds(dsn, directory, (label, source, sink), versions, args), versions
                )
        imports = [f"{version.label} ran {version.imported()}" for version in versions]
    print(f"\n{args.events} events per drain, {args.rounds} rounds per version, alternating")
    print("\n".join(imports))
    columns = " ".join(f"{name:>10} {'min':>9} {'max':>9}" for name in ("events/s", "ev/CPU-s"))
    print(f"{'run (medians)':18} {'version':28} {columns} {'RSS MB':>8}")
    print("\n".join(results))


if __name__ == "__main__":
    main()
