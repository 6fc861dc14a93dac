"""Replaying stored raw events (``scripts/reprocess``), e.g. retirements again after a fix.

Applying an event is idempotent (:mod:`cache.ingest.apply`), so replaying changes only what
the replica got wrong; entities that need a fresh read are queued for a fetch as in a poll.
The cursor and the gaps are not moved; the heartbeat is dropped (proxies pass until the ingester
has caught up again). The caller leads first.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from ..proxy.service import REPLICA_STATE_TTL
from ..replica.statekeys import INGESTER_HEARTBEAT
from ..replica.store import Store
from .eventwire import RETIREMENT_FIELD, split_event_type
from .poll import Ingester

#: Seconds the first chunk waits after the heartbeat is dropped: longer than a proxy goes on
#: using the heartbeat it read last.
STATE_TTL = REPLICA_STATE_TTL + 0.5


def replay(store: Store, ingester: Ingester, *, from_id: int = 0, types: set[str] | None = None,
           retirement: bool = False, chunk: int = 500) -> int:
    """Apply stored raw events again, in id order (``scripts/reprocess``); returns how many.

    Each chunk commits on its own, and replaying old events passes through the states they
    left (a value set, then set back by a later chunk's event): the heartbeat is dropped first,
    so proxies pass (``stale``) until the ingester, started again, reaches the end of the log."""
    table = store.events
    conn = ingester.connect()
    with conn.begin():
        store.set_state(conn, INGESTER_HEARTBEAT, None)
    time.sleep(STATE_TTL)
    last, count = from_id - 1, 0
    while True:
        with conn.begin():
            rows = conn.execute(sa.select(table.c.id, table.c.event_type, table.c.body)
                                .where(table.c.id > last).order_by(table.c.id).limit(chunk)).all()
            for row in rows:
                event = json.loads(row.body)
                if _selected(event, types, retirement):
                    ingester.apply_event(conn, event)
                    count += 1
        if len(rows) < chunk:
            return count
        last = rows[-1].id


def _selected(event: Mapping[str, Any], types: set[str] | None, retirement: bool) -> bool:
    """Whether ``event`` is one of ``types`` (all if none) and, with ``retirement``, a retirement,
    a revival or a ``retirement_date`` change."""
    parsed = split_event_type(event.get("event_type"))
    if parsed is None:
        return False
    if types and parsed[0] not in types:
        return False
    if not retirement:
        return True
    if parsed[1] in ("Retirement", "Revival"):
        return True
    return parsed[1] == "Change" and event.get("attribute_name") == RETIREMENT_FIELD
