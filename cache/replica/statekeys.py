"""Every key of ``sgcache_state`` (the replica's small key/value table), in one place.

Each key has one writer; the readers import the name from here, never spell the string.
The rules the event keys keep are in :mod:`cache.ingest` (the package docstring).
"""

from __future__ import annotations

#: The site the replica copies (cache/replica/site.py binds it once; every program checks it).
SITE = "site"

#: Every event id at or below it is applied or given up. Set first by ``scripts/scan --full``
#: (before the prime) or by the ingester: the newest event id, or just below an id not visible
#: yet (cache/ingest/gaps.py ``starting_cursor``); moved by the ingester. The proxy
#: answers EventLogEntry reads only below it (cache/ingest/eventlog.py).
EVENT_CURSOR = "event_cursor"
#: The highest event id applied; ids between the cursor and it never seen are open gaps.
#: The proxy compares it before and after a write (has the ingester moved meanwhile?).
EVENT_HIGH = "event_high"
#: The cursor the replica started from (set with the first cursor): events at or below it
#: came with the scan, and the ingester's sweep never looks there.
EVENT_FLOOR = "event_floor"
#: The newest ``created_at`` the ingester has seen: SG's clock, in SG's wire form.
SG_CLOCK = "sg_clock"

#: ISO UTC time of the ingester's last successful poll; the proxy serves reads only while it
#: is younger than ``sgcache_max_lag``.
INGESTER_HEARTBEAT = "ingester_heartbeat"
#: Who leads the ingestion (pid, host, since): informational.
INGESTER_LEADER = "ingester_leader"
#: Field names named by schema (DisplayColumn) events, to re-check against the site's schema.
SCHEMA_PENDING = "schema_pending"

#: The start (database clock) of the last ingester poll that reached the end of the log: the
#: pending-write markers older than it clear once the fetch queue is empty (cache/replica/pending.py).
PENDING_CAUGHT_UP = "pending_caught_up"
#: The change log's ``seq`` at or below which every record a proxy left (a learnt write) is older
#: than the events the ingester applies now: set by the ingester once a poll that reached the end
#: of the log started ``MARGIN`` seconds after a poll that saw that ``seq``. Above it, an event
#: that would change a row a proxy wrote is not applied; SG's row is read (cache/ingest/apply.py).
CHANGES_SETTLED = "changes_settled"

#: The rule by which the replica's indexes on lowered text were built (cache/replica/textcase.py
#: ``LOWERING``): the first process to open a replica indexed with another rebuilds them.
TEXT_LOWERING = "text_lowering"
