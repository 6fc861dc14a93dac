"""The event ingester: polls SG's EventLogEntry and applies each event to the replica.

The invariants (each module says which of them it keeps):

- **One poll is one transaction** (batch.py): the new events are applied, stored raw in
  ``sgcache_events``, the gaps (ids not yet visible) updated, and the cursor and the heartbeat
  advanced, all together; a process killed at any point leaves either the whole poll or none
  of it. When EventLogEntry is a cached type, every applied event also becomes its
  EventLogEntry row in that transaction. All replica writes go through
  :class:`cache.replica.writes.WriteBatch` (upserts, so the proxy writing the same rows at the same
  moment never collides with a poll).
- **Never lose an update** (apply.py, fetch.py): entities whose values cannot be taken from an
  event (New, Revival, rows never seen, values in doubt, events that filled a gap late) are put
  in the ``sgcache_fetch`` queue in that same transaction and re-read from SG right after it
  commits, grouped per type (``id in [...]``, then ``retired_only`` for the rest).
- **The old-value guard** (apply.py): a Change whose ``old_value`` and ``new_value`` both
  differ from the row's value is not applied but fetched: the row holds a later write (the
  proxy learned it before this event was polled) or missed one, and an older value must not
  overwrite a newer one.
- **After a proxy's write** (apply.py, settling.py): an event on a row a proxy wrote since the
  ingester last caught up past that write (``changes_settled``), or linking to such a row, is
  applied only where it changes nothing; otherwise the row is fetched (the event may be older
  than the write, and the old-value guard cannot tell: A -> B by someone, B -> A through the
  proxy). The change log is pruned of settled records an hour old (settling.py), and
  ``sgcache_events`` of the events older than ``events_keep`` (retention.py).
- **Cursor, high, floor and gaps** (gaps.py; the keys are in cache/replica/statekeys.py):

  - ``event_cursor``: every event id at or below it is applied or given up;
  - ``event_high``: the highest event id applied; ids between the cursor and it that were
    never seen are open gaps (``sgcache_gaps``), looked for on every poll and given up once
    the event that revealed them is ``gap_timeout`` seconds old by SG's clock;
  - ``event_floor``: the cursor the replica started from (set with the first cursor, by the
    prime or by the ingester): events at or below it came with the scan, and the sweep never
    looks there. That first cursor is below any recent id not visible yet (a transaction open
    when it was read, which commits later): such an id is waited for as a gap;
  - ``ingester_heartbeat``: ISO UTC time, on the database server's clock, at which the last poll
    that reached the end of the stream asked SG; ``sg_clock``: the newest
    ``created_at`` seen; ``schema_pending``: field names named by schema (DisplayColumn)
    events, to re-check (schemarefresh.py); ``ingester_leader``: who leads (informational).

- **Gap time is SG's time** (sgclock.py): a gap's ``first_seen`` is the ``created_at`` of the
  first visible event above it, and "now" is SG's clock estimated as the newest ``created_at``
  seen plus the local time elapsed since it was seen (the local clock measures only elapsed
  time, so skew between the hosts does not matter; with no ``created_at`` ever seen the local
  clock stands in).
- **The sweep** (poll.py): an id that becomes visible after its gap was given up is found by
  the sweep, every ``sweep_every`` polls: the given-up ids (kept in ``sgcache_given_up``, in the
  poll's transaction that gave them up, so a restart loses none) are asked for by id, however
  long ago their transaction started or the ingester stopped, until one that asks SG
  ``given_up_keep`` seconds (SG's clock) after they were given up; and the ids of events created
  in the last ``sweep_window`` seconds (default twice the gap timeout) are read, so any id above
  ``event_floor`` missing from ``sgcache_events`` (a gap too wide to wait for) is found too. Each
  is applied as a late event, and forgotten as given up in the same transaction.
- **Leadership** (leader.py): on PostgreSQL a session advisory lock on a connection held for
  the process lifetime, which is also the connection every write goes through (so a leader
  that lost its session cannot write); on SQLite an OS file lock next to the database file,
  released by the kernel however the process dies.

Modules: ``poll`` (:class:`Ingester`: the loop, a poll, the sweep), ``batch`` (a poll's
transaction), ``apply`` (one event), ``settling`` (which proxies' writes it is past), ``retention`` (how long applied events are kept), ``gaps`` (cursor, gaps, floor), ``sgclock``, ``fetch``
(the fetch queue's reader; the queue itself is cache/replica/fetchqueue.py), ``schemarefresh``,
``leader``, ``replay`` (``scripts/reprocess``), ``eventwire`` (what an event is on the
wire), and ``config``. (The read side of the cursor contract, which EventLogEntry reads the proxy may
answer, is cache/read/eventlog.py.) They all
log as ``sgcache.events``, the ingester's logger name from before it was a package.
"""

from __future__ import annotations

from ..replica.dialect import (
    FileLock,
    LeaderLock,
    LockHeld,
    NoLock,
    PgAdvisoryLock,
    engine_options,
    leader_lock_for,
)
from .config import IngestConfig, PollResult, SGClient
from .eventwire import DEEP_FIELDS, EVENT_FIELDS
from .poll import Ingester
from .replay import replay

__all__ = [
    "DEEP_FIELDS", "EVENT_FIELDS", "FileLock", "IngestConfig", "Ingester", "LeaderLock", "LockHeld",
    "NoLock", "PgAdvisoryLock", "PollResult", "SGClient", "engine_options", "leader_lock_for", "replay",
]
