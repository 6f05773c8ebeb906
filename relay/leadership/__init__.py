"""Leadership: one active relay per outbox, however many replicas run, also when the active one
freezes or is cut off.

The lease is a row of a table in the outbox's database: who holds it, a fencing token that
grows with every new holder, and when it expires. An advisory lock alone cannot be that lease:
the server keeps a session's lock for as long as the session lives, and a frozen process (a
SIGSTOP, a paused VM, a hung event loop) or a connection that a proxy holds open without
forwarding keeps its session alive; the lock never moves. A row with an expiry ends by time,
however the holder's connection looks.

- Acquire: a standby sets itself as holder, with the next token and an expiry `time` from now,
  where the row has expired (also when it names this standby): one UPDATE, so two standbys
  never both win.
- Renew: the holder moves its expiry on every `check_interval`, where the token is still its
  own, and only from the expiry it last saw. A renewal that fails is retried on a new
  connection until the holder's deadline.
- Unanswered statements: a statement the holder gave up waiting for may still commit (the
  request arrived; the answer was lost or late). Renewing from the last expiry seen, its retries
  move the expiry on once at most; taking only an expired row, and only a lease time after a
  statement went unanswered, a replica that can send but not hear cannot keep the lease from
  the standbys that can.
- Deadline: the holder's own clock when it sent its last successful renewal, plus the lease
  time, minus a margin (a tenth of it). The server set the expiry when it ran the renewal, after
  it was sent, so the deadline falls before the expiry by at least the margin.
- Clocks: the expiry is set and compared by the database server's clock alone (clock_timestamp()),
  so the replicas' clocks need not agree with it or with each other. The one assumption: a
  replica's monotonic clock and the server's clock run at the same rate within the margin over
  one lease time (10%: any working clock), and the server's clock is not stepped forward by more
  than the margin while a lease runs.
- The holder checks its deadline right before every publish and every acknowledgement (see
  `Term.valid`, used by the pipeline), and marks nothing past it: the polling source marks rows
  in the same statement that checks the token (see `Fence`). `/readyz` and
  `outbox_relay_leader` say active only while the term is valid.
- One lease per outbox, whatever the config says: the row's key is made of the outbox table as
  the server resolves it (or the slot), an unqualified lease table lives in that table's schema,
  and the holder also takes the outbox's guard, a session-level advisory lock keyed by the
  lease's key alone: a replica configured with another lease table (or finding another one
  through its search_path) takes a row of its own but not the guard, gives the row up and
  reports a setup problem. Any role may take and see an advisory lock, so this holds even when
  it may not read the other table. The guard is no lease (a frozen holder's session keeps it):
  a holder that took over an expired lease goes on while the guard is held by a stale session
  (its own, the previous holder's, or one an earlier holder noted in the row's `stale_guard`,
  as this one does for the holders after it), and takes it once that session is gone. A
  replica that saw the guard held by a live rival stands by for good (a setup problem).
- Fencing the old holder: a new holder ends the sessions of the one before (every session of a
  holder goes by `outbox-relay <holder id>`, relay.pgsession.SESSION_NAME), so a frozen holder
  that wakes finds its connections gone, its replication stream among them (PostgreSQL lets one
  process stream a slot at a time: the new holder could not stream before).
- Bounds: every wait on the network in the lease path is bounded for real (relay.pgsession
  bounded_query severs a connection that does not answer instead of cancelling the query and
  waiting for the cancel); a connection attempt is bounded by its connect timeout.
"""

from outbox_relay.leadership.guard import guard_key, holder_pid, session_name_of
from outbox_relay.leadership.lease import Lease
from outbox_relay.leadership.place import (
    LeasePlace,
    create_table_sql,
    lease_key,
    lease_line,
    lease_table_in,
    locate_lease,
)
from outbox_relay.leadership.term import MARGIN_FRACTION, LeaseLost, RivalLease, Term

__all__ = [
    "MARGIN_FRACTION",
    "Lease",
    "LeaseLost",
    "LeasePlace",
    "RivalLease",
    "Term",
    "create_table_sql",
    "guard_key",
    "holder_pid",
    "lease_key",
    "lease_line",
    "lease_table_in",
    "locate_lease",
    "session_name_of",
]
