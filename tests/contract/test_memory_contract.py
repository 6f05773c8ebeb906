"""The sink contract, run against the in-memory sink (outbox_relay.testing), with both
combinations of features it can declare: the suite holds it to each."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from outbox_relay.interfaces import SinkFeatures
from outbox_relay.testing import MemoryBroker, MemorySink
from outbox_relay.testing.sink_contract import Outage, SinkBackend, SinkContract


@contextmanager
def _outage(features: SinkFeatures) -> Iterator[Outage]:
    broker = MemoryBroker(dedupes_by_id=features.dedupes_by_id)
    yield Outage(MemorySink(broker, features), broker.lines, broker.refuse, broker.silence, broker.restore)


def _unreachable() -> MemorySink:
    broker = MemoryBroker()
    broker.refuse()
    return MemorySink(broker)


@pytest.fixture(
    params=[SinkFeatures(), SinkFeatures(keeps_order=True, dedupes_by_id=True)],
    ids=["plain", "ordered-deduplicating"],
)
def sink_backend(request: pytest.FixtureRequest) -> SinkBackend:
    features: SinkFeatures = request.param
    broker = MemoryBroker(dedupes_by_id=features.dedupes_by_id)
    return SinkBackend(MemorySink(broker, features), broker.lines, _unreachable, lambda: _outage(features))


class TestMemorySink(SinkContract):
    pass
