"""What the ingester is given (its tunables, the SG client it reads) and what one poll reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class SGClient(Protocol):
    """The part of ``shotgun_api3.Shotgun`` the ingester uses."""

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None,
             order: list[dict[str, str]] | None = None, filter_operator: str | None = None,
             limit: int = 0, retired_only: bool = False) -> list[dict[str, Any]]: ...

    def schema_read(self) -> dict[str, Any]: ...


@dataclass
class IngestConfig:
    """Tunables of the ingester (the script's flags)."""

    batch: int = 500
    # events per poll after a full one, until the end of the stream (shotgun_api3 reads them in
    # pages of SG's 500; they are applied in one transaction)
    catch_up_batch: int = 2000
    poll_interval: float = 1.0
    # while no events come the wait grows to this ceiling (never below poll_interval); a change on
    # an idle site is then visible within idle_max plus the apply time. None: no back-off.
    idle_max: float | None = 3.0
    gap_timeout: float = 300.0
    sweep_every: int = 30  # polls between sweeps for ids that became visible after being given up; 0: never
    sweep_window: float | None = None  # seconds of SG time a sweep looks back (default 2 x gap_timeout)
    sweep_limit: int = 10_000
    # seconds of SG time a given-up id is still looked for by id, by every sweep and across restarts
    # (a transaction that commits later than gap_timeout plus this is lost); at most given_up_max ids
    given_up_keep: float = 6 * 3600.0
    # seconds of SG time the applied events are kept in sgcache_events (retention.py); 0: all
    events_keep: float = 30 * 86400.0
    given_up_max: int = 1000
    max_gap_span: int = 10_000
    lock_retry: float = 1.0
    retry_max: float = 60.0

    def __post_init__(self) -> None:
        self.catch_up_batch = max(self.catch_up_batch, self.batch)  # never smaller than a normal poll

    def sweep_seconds(self) -> float:
        return self.sweep_window if self.sweep_window is not None else 2 * self.gap_timeout

    def idle_ceiling(self) -> float:
        if self.idle_max is not None:
            return max(self.idle_max, self.poll_interval)
        return self.poll_interval


@dataclass
class PollResult:
    """What one poll (or sweep) did."""

    received: int = 0
    applied: int = 0
    full: bool = False
    #: When the poll asked SG for events, if it got the end of the stream (not a full batch): the
    #: heartbeat. A poll still working through a backlog, or a sweep, says nothing of freshness.
    caught_up_at: str | None = None
    gaps_opened: int = 0
    gaps_filled: int = 0
    gaps_expired: list[int] = field(default_factory=list)
    #: given-up ids no longer looked for (``given_up_keep`` passed, or more than ``given_up_max``)
    given_up_dropped: list[int] = field(default_factory=list)
    swept: list[int] = field(default_factory=list)
