"""outbox-relay: moves transactional-outbox events from PostgreSQL to message brokers."""

__version__ = "0.1.0"
