"""SG's clock, as the ingester estimates it: gap time is SG's time, never the local one.

"Now" is the newest ``created_at`` seen plus the local time elapsed since it was seen: the
local clock measures only elapsed time (the ingester's is :class:`SteadyClock`, which a step of
the wall clock does not move), so skew between the hosts does not matter. With no
``created_at`` ever seen the local clock stands in. The newest ``created_at`` is kept in
``sg_clock`` (in the poll's transaction), so a restarted ingester starts from it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Connection

from ..replica.statekeys import SG_CLOCK
from ..replica.store import Store, now_utc
from ..wire import format_wire_dt, parse_wire_dt


class SteadyClock:
    """The local UTC time, moved by the monotonic clock from when it was made: a step of the wall
    clock (an NTP correction, an operator setting the date) does not move it, so it measures
    elapsed time only (a forward step would otherwise age every open gap at once)."""

    def __init__(self) -> None:
        self._start = (now_utc(), time.monotonic())

    def __call__(self) -> dt.datetime:
        wall, mono = self._start
        return wall + dt.timedelta(seconds=time.monotonic() - mono)


class SGClock:
    """SG's time, estimated from the events' ``created_at`` and the local ``clock``'s elapsed time."""

    def __init__(self, store: Store, clock: Callable[[], dt.datetime]):
        self.store = store
        self.clock = clock
        self._anchor: tuple[dt.datetime, dt.datetime] | None = None  # (SG time seen, local time then)

    def now(self) -> dt.datetime:
        """SG's clock (naive UTC): the newest ``created_at`` seen plus local time elapsed since;
        the local clock when no ``created_at`` was ever seen."""
        local = self.clock()
        if self._anchor is None:
            return local
        seen, at = self._anchor
        return seen + max(local - at, dt.timedelta(0))

    def load(self, conn: Connection) -> None:
        """Start from the stored ``sg_clock`` (once per process)."""
        if self._anchor is None:
            seen = parse_wire_dt(self.store.get_state(conn, SG_CLOCK))
            if seen is not None:
                self._anchor = (seen, self.clock())

    def see(self, conn: Connection, events: Sequence[Mapping[str, Any]]) -> None:
        """Move the estimate forward to the newest ``created_at`` among ``events`` (and store it)."""
        times = [t for t in (parse_wire_dt(e.get("created_at")) for e in events) if t is not None]
        if not times:
            return
        newest = max(times)
        if self._anchor is None or newest > self.now():
            self._anchor = (newest, self.clock())
        stored = parse_wire_dt(self.store.get_state(conn, SG_CLOCK))
        if stored is None or newest > stored:
            self.store.set_state(conn, SG_CLOCK, format_wire_dt(newest))
