"""Shadow reads: a sample of hits also read from SG in the background, and compared.

The request path only decides (a random draw, a token bucket) and puts the read on a bounded
queue (full: dropped, counted); one daemon thread sends it to SG with the client's own
credentials through the proxy's upstream client, compares, counts and keeps disagreements.
Credentials are never logged or stored. With enforcement on, a disagreement switches the rules
the read relied on off: reads that rely on one pass (``audit-disabled``) until an operator clears
it; every proxy on the replica sees it within :data:`REFRESH_SECONDS`.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from ..ops.access import who
from ..proxy import upstream
from . import table
from .compare import agree
from .rules import read_rules, rule_names, uses_relative

log = logging.getLogger("sgcache.audit")

#: Reads waiting for their shadow; more are dropped.
QUEUE_SIZE = 100
#: How often the rules switched off are re-read from the database.
REFRESH_SECONDS = 1.0
#: Relative-date hits are all sampled (within the rate) until this many of them agreed.
RELATIVE_AGREEMENTS = 100
#: A disagreement is checked again this much later (both sides read anew): when they agree then,
#: the data changed between the hit and its shadow read (outcome ``changed``, not a disagreement).
RECHECK_SECONDS = 1.5


@dataclass(frozen=True)
class AuditOptions:
    percent: float = 0.0  # of hits
    rate: float = 5.0  # shadow reads per second, at most
    enforce: bool = False


@dataclass(frozen=True)
class Shadow:
    """One sampled hit: where it goes, with whose credentials, and the cache's answer."""

    url: str
    site: str  # whose credentials: the site they are verified for (cache/proxy/auth.py)
    auth: Any
    args: Any
    body: bytes
    tls: ssl.SSLContext | None


class AuditMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["entity_type", "operator", "rule"]
        self.agreements = Counter("sgcache_audit_agreements", "Audited hits SG answered the same, per "
                                  "condition kind (operator, rule) the read relied on", labels, registry=registry)
        self.disagreements = Counter("sgcache_audit_disagreements", "Audited hits SG answered differently, per "
                                     "condition kind (operator, rule) the read relied on", labels, registry=registry)
        self.reads = Counter("sgcache_audit_reads", "Audited hits, by outcome (agree, disagree, changed: "
                             "the data changed in between, error: SG's answer could not be had)",
                             ["entity_type", "outcome"], registry=registry)
        self.dropped = Counter("sgcache_audit_dropped", "Sampled hits not audited: queue full, or over "
                               "sgcache_audit_rate", ["why"], registry=registry)


_METRICS: dict[int, AuditMetrics] = {}


def audit_metrics(registry: CollectorRegistry) -> AuditMetrics:
    """The audit's counters in ``registry`` (registered once per registry)."""
    if id(registry) not in _METRICS:
        _METRICS[id(registry)] = AuditMetrics(registry)
    return _METRICS[id(registry)]


class Audit:
    """The audit of one proxy. ``service()``: the open CacheService (None: no replica);
    ``label``: an entity type as a metric label; ``heard(site, auth, reply)``: SG's decoded
    answer to a shadow read, made with the client's credentials (it may say they are refused now)."""

    def __init__(self, service: Callable[[], Any], registry: CollectorRegistry,
                 label: Callable[[object], str] = str, draw: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 heard: Callable[[str, Any, Any], object] | None = None) -> None:
        self.service = service
        self.heard = heard
        self._sleep = sleep
        self.metrics = audit_metrics(registry)
        self.label = label
        self.options = AuditOptions()
        self.disabled: frozenset[str] = frozenset()  # rules switched off (with enforcement on)
        self._draw, self._clock = draw, clock
        self._queue: queue.Queue[Shadow | None] = queue.Queue(QUEUE_SIZE)
        self._tokens, self._tokens_at = 0.0, clock()
        self._relative_agreed = 0
        self._counts = {"agree": 0, "disagree": 0, "changed": 0, "error": 0, "dropped": 0}
        self._latest: list[tuple[str, str, str]] = []
        self._thread: threading.Thread | None = None
        self._tables_for: Any = None
        self._lock = threading.Lock()

    # -- options and lifecycle -------------------------------------------------------------
    def configure(self, options: AuditOptions) -> None:
        self.options = options
        if not options.enforce:
            self.disabled = frozenset()
        if (options.percent > 0 or options.enforce) and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sgcache-audit", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.options.percent > 0 or self.options.enforce

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            thread.join(timeout=2)

    # -- the request path (mitmproxy's event loop: no I/O) ---------------------------------
    def refused(self, schema: Any, args: Any) -> str | None:
        """``audit-disabled`` when the read relies on a rule enforcement switched off."""
        if not self.disabled:
            return None
        return "audit-disabled" if rule_names(read_rules(schema, args)) & self.disabled else None

    def offer(self, url: str, site: str, auth: Any, args: Any, body: bytes,
              tls: Callable[[], ssl.SSLContext] | None) -> None:
        """A hit was answered: audit it when drawn (never blocks). ``tls()``: how SG's certificate
        is checked (None: http), asked only for a hit drawn."""
        percent = self.options.percent
        if percent <= 0:
            return
        boost = self._relative_agreed < RELATIVE_AGREEMENTS and uses_relative(args)
        if not boost and self._draw() * 100 >= percent:
            return
        if not self._take_token():
            self._drop("rate")
            return
        try:
            self._queue.put_nowait(Shadow(url, site, auth, args, body, tls() if tls is not None else None))
        except queue.Full:
            self._drop("queue-full")

    def _tell(self, item: Shadow, reply: Any) -> None:
        """SG answered a shadow read: what it says of the client's credentials counts, as an answer
        to the client itself would (a key revoked since it was verified is refused from now on)."""
        if self.heard is None:
            return
        try:
            self.heard(item.site, item.auth, reply)
        except Exception:  # noqa: BLE001 - a bug: the audit goes on
            log.exception("audit: could not note what SG said of a read's credentials")

    def _take_token(self) -> bool:
        rate = self.options.rate
        if rate <= 0:
            return True
        with self._lock:
            now = self._clock()
            self._tokens = min(max(1.0, rate), self._tokens + (now - self._tokens_at) * rate)
            self._tokens_at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True

    def _drop(self, why: str) -> None:
        self.metrics.dropped.labels(why=why).inc()
        with self._lock:
            self._counts["dropped"] += 1

    # -- the worker thread -----------------------------------------------------------------
    def _run(self) -> None:
        refreshed = 0.0
        while True:
            try:
                item = self._queue.get(timeout=REFRESH_SECONDS)
            except queue.Empty:
                item = False  # type: ignore[assignment]
            if item is None:
                return
            # enforcing: the rules another proxy switched off count within a second; else only the
            # status page's newest disagreements are re-read, now and then
            if time.monotonic() - refreshed >= REFRESH_SECONDS * (1 if self.options.enforce else 10):
                refreshed = time.monotonic()
                self._refresh()
            if item:
                try:
                    self.audit(item)
                except Exception:  # noqa: BLE001 - the audit never takes the proxy down
                    log.warning("audit failed", exc_info=True)

    def _tables(self, service: Any) -> None:
        if self._tables_for is not service:
            table.create(service.store.write_engine)
            self._tables_for = service

    def _refresh(self) -> None:
        """Re-read the rules switched off and the newest disagreements (another proxy's too)."""
        service = self.service()
        if service is None:
            return
        try:
            self._tables(service)
            with service.store.engine.connect() as conn:
                off = table.disabled_rules(conn)
                latest = table.latest(conn)
        except Exception as exc:  # noqa: BLE001 - the database is in trouble: keep what we had
            log.debug("audit tables not readable: %s", exc)
            return
        self.disabled = frozenset(off) if self.options.enforce else frozenset()
        self._latest = latest

    def audit(self, item: Shadow) -> None:
        """Read ``item`` from SG, compare, count, and keep a disagreement."""
        service = self.service()
        args = item.args
        entity_type = self.label(args.get("type") if isinstance(args, dict) else None)
        pairs = read_rules(service.schema, args) if service is not None else {("-", "plain")}
        try:
            reply = upstream.post_json(item.url, {"method_name": "read", "params": [item.auth, args]}, item.tls)
            self._tell(item, reply)
            sg_results = reply["results"]
            cache_results = json.loads(item.body)["results"]
        except Exception as exc:  # noqa: BLE001 - SG refused or failed: nothing to compare (no credentials logged)
            log.info("audit: SG's answer to a %s read could not be had: %s", entity_type, type(exc).__name__)
            self.metrics.reads.labels(entity_type=entity_type, outcome="error").inc()
            self._count("error")
            return
        same = agree(cache_results, sg_results, args)
        if not same and self._changed_meanwhile(item, service):
            log.info("audit: a %s read differed from SG's, then agreed: the data changed in between", entity_type)
            self.metrics.reads.labels(entity_type=entity_type, outcome="changed").inc()
            self._count("changed")
            return
        counter = self.metrics.agreements if same else self.metrics.disagreements
        for operator, rule in sorted(pairs):
            counter.labels(entity_type=entity_type, operator=operator, rule=rule).inc()
        self.metrics.reads.labels(entity_type=entity_type, outcome="agree" if same else "disagree").inc()
        self._count("agree" if same else "disagree")
        if same:
            if uses_relative(args):
                self._relative_agreed += 1
            return
        rules = sorted(rule_names(pairs))
        log.warning("audit: SG answered a %s read differently (rules: %s)%s", entity_type, ", ".join(rules),
                    "; switching them off" if self.options.enforce else "")
        if service is None:
            return
        try:
            self._tables(service)
            with service.store.write_engine.begin() as conn:
                audit_id = table.record(conn, entity_type, [f"{o} {r}" for o, r in sorted(pairs)],
                                        {"who": who(item.auth), "method": "read", "params": args},
                                        cache_results, sg_results)
                if self.options.enforce:
                    table.disable(conn, rules, entity_type, audit_id)
        except Exception as exc:  # noqa: BLE001 - counted anyway; the row is lost
            log.warning("audit: could not keep a disagreement: %s", type(exc).__name__)
            return
        if self.options.enforce:
            self.disabled = self.disabled | frozenset(rules)
        self._refresh()

    def _changed_meanwhile(self, item: Shadow, service: Any) -> bool:
        """Whether both sides, read again a moment later, agree (a write landed between the hit
        and its shadow read); False when either cannot be read again."""
        if service is None:
            return False
        self._sleep(RECHECK_SECONDS)
        try:
            sg_again = upstream.post_json(item.url, {"method_name": "read", "params": [item.auth, item.args]},
                                          item.tls)["results"]
            cache_again = service.read(item.args)
        except Exception:  # noqa: BLE001 - a pass (pending write, stale) or SG failing: it stands
            return False
        return agree(cache_again, sg_again, item.args)

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1

    # -- the status page -------------------------------------------------------------------
    def rows(self) -> Sequence[tuple[str, str]] | None:
        """The audit's lines on the status page (None: not enabled)."""
        if not self.enabled:
            return None
        o = self.options
        with self._lock:
            c = dict(self._counts)
        out = [("sampled", f"{o.percent:g}% of hits, at most {o.rate:g}/s"
                + ("; enforcing" if o.enforce else "")),
               ("compared", str(c["agree"] + c["disagree"])), ("agreements", str(c["agree"])),
               ("disagreements", str(c["disagree"])), ("changed in between", str(c["changed"])),
               ("errors (SG)", str(c["error"])),
               ("dropped", str(c["dropped"])),
               ("rules switched off", ", ".join(sorted(self.disabled)) or "none")]
        out += [(f"disagreement {at}", f"{t}: {rules}") for at, t, rules in self._latest]
        return out
