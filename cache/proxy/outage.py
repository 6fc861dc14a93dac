"""When SG counts as down, and for how long the proxy then answers by itself.

SG is down for a host when a connection to it could not be made (refused, DNS, TLS) while the
client waited (a client that hangs up first is no sign of it), when a write could not be sent, or when it (or its load balancer) answered 502, 503 or 504 on
:data:`OUTAGE_CONNECTIONS` different client connections within :data:`OUTAGE_SECONDS`. For
:data:`OUTAGE_SECONDS` after that, requests to that host are answered offline
(``sgcache_offline``): cacheable reads from the replica, marked stale; ``info`` from the last
copy seen (:mod:`.offline`); everything else with an error naming the outage. Then SG is
tried again.

A connection SG accepted and then dropped is that request's failure, not an outage, and so is
one client's 502 or 504 (a request that outlasts the load balancer's timeout, or breaks the
worker serving it): one hostile or heavy request must not switch the proxy to offline answers,
and refuse writes, for everybody. The read that got such an answer is still answered offline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("sgcache")

#: After SG failed to answer, requests are served offline for this long before SG is tried again.
OUTAGE_SECONDS = 10.0
#: Upstream statuses that mean the site (or its load balancer) is down, or that one request failed.
OUTAGE_STATUSES = frozenset({502, 503, 504})
#: Client connections that must get one of those within OUTAGE_SECONDS for SG to count as down
#: (connections, not addresses: behind a TCP balancer every client has the balancer's address; a
#: client re-sends a 502/504 on the connection it has).
OUTAGE_CONNECTIONS = 3


def never_connected(tcp_setup: float | None, tls: bool, tls_setup: float | None) -> bool:
    """Whether a failed upstream connection never got through (TCP, or TLS when it was wanted):
    SG is unreachable. Otherwise SG accepted the connection and dropped one request."""
    return tcp_setup is None or (tls and tls_setup is None)


class Outages:
    """The hosts SG is down at, each until when (monotonic clock)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.down_until: dict[str, float] = {}
        self._clock = clock
        #: Per host, the client connections that got an outage status, and when (the last one).
        self._failed: dict[str, dict[str, float]] = {}

    def is_down(self, host: str, offline: bool) -> bool:
        """Whether requests to ``host`` are answered offline now (``offline``: the
        ``sgcache_offline`` option). Once the outage is over (or offline answers are off),
        it is forgotten: SG is tried again."""
        until = self.down_until.get(host)
        if until is None:
            return False
        if self._clock() < until and offline:
            return True
        del self.down_until[host]  # time to try SG again
        return False

    def note(self, host: str, why: str) -> None:
        """SG at ``host`` could not answer: answer offline for the next :data:`OUTAGE_SECONDS`."""
        if host not in self.down_until:
            log.warning("SG at %s unreachable (%s): serving offline for %.0fs", host, why, OUTAGE_SECONDS)
        self.down_until[host] = self._clock() + OUTAGE_SECONDS

    def note_status(self, host: str, status: int, client: str) -> bool:
        """Whether SG's ``status`` on the client connection ``client`` is one a site that is down
        gives (that request may be answered offline). SG counts as down once
        :data:`OUTAGE_CONNECTIONS` client connections got one within :data:`OUTAGE_SECONDS`."""
        if status not in OUTAGE_STATUSES:
            return False
        now = self._clock()
        failed = self._failed.setdefault(host, {})
        failed[client] = now
        for other, at in list(failed.items()):
            if at < now - OUTAGE_SECONDS:
                del failed[other]
        if len(failed) >= OUTAGE_CONNECTIONS:
            self.note(host, f"HTTP {status} on {len(failed)} client connections")
        return True
