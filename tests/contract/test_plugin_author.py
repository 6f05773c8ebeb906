"""A plugin's author runs the exported contract suite against their own sink, from our wheel
alone: the wheel is built and installed into a folder of its own (nothing else of ours on the
path), a plugin sink is written into a temporary folder, and pytest runs there. A correct sink
passes; sinks broken in the ways the suite exists to catch fail exactly the tests for their flaws."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import REPO

#: The plugin: sinks in front of the in-memory broker that ships with the relay (a stand-in
#: for the author's real one), one correct and three broken.
_PLUGIN = '''
import asyncio

from outbox_relay.events import Failure
from outbox_relay.interfaces import ConnectorError, Sink, SinkFeatures
from outbox_relay.testing import BrokerState, MemoryBroker


class GoodSink(Sink):
    kind = "plugin"

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def start(self):
        if self.broker.state is not BrokerState.UP:
            raise ConnectorError("the broker cannot be reached")

    async def publish(self, events):
        if self.broker.state is BrokerState.REFUSING:
            raise ConnectorError("connection refused")
        if self.broker.state is BrokerState.SILENT:
            await asyncio.sleep(0.05)
            return [Failure("no acknowledgement in time", transient=True)] * len(events)
        for event in self.ordered(events):
            self.broker.store(event)
        return [None] * len(events)

    def ordered(self, events):
        return events


class RaisingSink(GoodSink):
    """A bug: without a connection, publish raises TypeError instead of a connector's error."""

    async def start(self):
        pass

    async def publish(self, events):
        if self.broker.state is not BrokerState.UP:
            return None + len(events)
        return await super().publish(events)


class ReorderingSink(GoodSink):
    """Declares that it keeps a call's order, and sends a call's events backwards."""

    features = SinkFeatures(keeps_order=True)

    def ordered(self, events):
        return list(reversed(events))


class EagerSink(GoodSink):
    """Acknowledges at once and sends at close: acks before the broker has the events."""

    async def start(self):
        self.pending = []

    async def publish(self, events):
        self.pending += events
        return [None] * len(events)

    async def close(self):
        if self.broker.state is BrokerState.UP:
            for event in self.pending:
                self.broker.store(event)
'''

_TESTS = """
from contextlib import contextmanager

import pytest

from outbox_relay.testing import MemoryBroker
from outbox_relay.testing.sink_contract import Outage, SinkBackend, SinkContract
from plugin_sink import {sink} as PluginSink


def unreachable():
    broker = MemoryBroker()
    broker.refuse()
    return PluginSink(broker)


@contextmanager
def outage():
    broker = MemoryBroker()
    yield Outage(PluginSink(broker), broker.lines, broker.refuse, broker.silence, broker.restore)


@pytest.fixture
def sink_backend():
    broker = MemoryBroker()
    yield SinkBackend(PluginSink(broker), broker.lines, unreachable, {outage})


class TestPluginSink(SinkContract):
    pass
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our wheel, built from a copy of the sources and installed alone into a folder."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("relay", "connectors"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(work / "dist"), str(source)], check=True, timeout=600
    )
    (wheel,) = (work / "dist").glob("outbox_relay-*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=600)
    return site


def _plugin_run(site: Path, folder: Path, sink: str, outage: bool = True) -> subprocess.CompletedProcess[str]:
    """pytest on a plugin's test file in `folder`, with our wheel's folder as the only path to us;
    without `outage`, the plugin's fixture says its broker cannot be taken away."""
    folder.mkdir()
    (folder / "plugin_sink.py").write_text(textwrap.dedent(_PLUGIN))
    (folder / "test_plugin_sink.py").write_text(
        textwrap.dedent(_TESTS.format(sink=sink, outage="outage" if outage else "None"))
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{folder}"}
    where = subprocess.run(
        [sys.executable, "-c", "import outbox_relay.testing.sink_contract as m; print(m.__file__)"],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), f"imported from {where.stdout}, not the wheel"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", "test_plugin_sink.py"],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _failed(done: subprocess.CompletedProcess[str]) -> set[str]:
    prefix = "FAILED test_plugin_sink.py::TestPluginSink::"
    return {
        line.removeprefix(prefix).split(" ")[0]
        for line in done.stdout.splitlines()
        if line.startswith(prefix)
    }


def test_a_correct_plugin_sink_passes_the_exported_suite(installed: Path, tmp_path: Path) -> None:
    done = _plugin_run(installed, tmp_path / "plugin", "GoodSink")
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    assert "failed" not in done.stdout


_OUTAGE = "test_while_the_broker_is_away_and_events_wait_the_relay_is_not_ready_and_recovers_once_it_is_back"


@pytest.mark.parametrize(
    ("sink", "fails", "outage"),
    [
        # Its TypeError fails the call in the pipeline too: the outage test reports it as a bug.
        (
            "RaisingSink",
            {
                "test_a_broken_destination_never_reports_an_acknowledgement",
                f"{_OUTAGE}[refused]",
                f"{_OUTAGE}[silent]",
            },
            True,
        ),
        # After the outage the pipeline hands it each aggregate's waiting events as a run.
        (
            "ReorderingSink",
            {
                "test_an_order_keeping_sink_stores_runs_of_one_aggregate_in_one_call_in_order",
                f"{_OUTAGE}[refused]",
                f"{_OUTAGE}[silent]",
            },
            True,
        ),
        # (It fails the outage test too, acknowledging while the broker is away, but only once
        # that test's minute of waiting for "not ready" is over: left out.)
        (
            "EagerSink",
            {
                "test_a_broken_destination_never_reports_an_acknowledgement",
                "test_an_acknowledged_event_is_stored_when_publish_returns",
            },
            False,
        ),
    ],
    ids=["RaisingSink", "ReorderingSink", "EagerSink"],
)
def test_a_broken_plugin_sink_fails_the_tests_for_its_flaws(
    installed: Path, tmp_path: Path, sink: str, fails: set[str], outage: bool
) -> None:
    done = _plugin_run(installed, tmp_path / "plugin", sink, outage)
    assert done.returncode == 1, done.stdout + done.stderr
    assert _failed(done) == fails, done.stdout
