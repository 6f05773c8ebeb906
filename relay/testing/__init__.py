"""Testing support shipped with the relay: an in-memory broker, sink and source with fault
injection (relay.testing.memory, relay.testing.faults), a dead-letter store in memory, events to
test with, and the sink contract suite a plugin's author runs against their own sink
(relay.testing.sink_contract, imported on its own: it needs pytest)."""

from outbox_relay.testing.deadletters import MemoryDeadLetters
from outbox_relay.testing.events import as_line, eventually, make_events, positional_event_id
from outbox_relay.testing.faults import CallFault, EventFault, FaultPlan, ScriptedFaults
from outbox_relay.testing.memory import (
    BrokerState,
    MemoryBroker,
    MemorySink,
    MemorySource,
    Message,
    SinkCall,
    SourceFaults,
)

__all__ = [
    "BrokerState",
    "CallFault",
    "EventFault",
    "FaultPlan",
    "MemoryBroker",
    "MemoryDeadLetters",
    "MemorySink",
    "MemorySource",
    "Message",
    "ScriptedFaults",
    "SinkCall",
    "SourceFaults",
    "as_line",
    "eventually",
    "make_events",
    "positional_event_id",
]
