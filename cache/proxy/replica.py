"""The replica the proxy serves from: opened at start, re-tried while its database is down (fail open).

With the database unreachable the proxy still runs and passes everything (``no-replica``); it
tries again every :data:`RETRY_SECONDS`. A replica that copies another site than the
configured one is refused: at start-up as an error (the wrong database), later only logged.
Without a configured site, the site stored in the replica is served (cache/replica/site.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from cache.private import redact, safe_url, url_secrets
from cache.proxy.answercache import ANSWER_CACHE_MB
from cache.proxy.breaker import short_error
from cache.proxy.dbwait import WRITE_WAIT_SECONDS
from cache.proxy.learning import MAX_UNRECORDED
from cache.proxy.service import CacheService
from cache.read.limits import PLAN_CACHE_SIZE
from cache.read.relative import RelativeDates
from cache.replica import site as sitemod
from cache.replica.dialect import url_problem
from cache.replica.pairs import DEFAULT_PAIRS_FILE, PairsError, load_pairs_file
from cache.replica.schema import Schema, SchemaError

log = logging.getLogger("sgcache")

#: With the replica unopenable, how often the proxy tries again.
RETRY_SECONDS = 5.0


class Refused(Exception):
    """The operator's mistake, refused at start: a database URL that cannot work, a bad schema or pairs
    file, or a replica of another site."""


class OneLineRefusal(logging.Filter):
    """For mitmproxy's script loader (logger ``mitmproxy.addons.script``): the addon's refusal of an
    option (an ``OptionsError`` whose message starts with ``sgcache``) is logged as one line, not a
    traceback. Other errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and type(exc).__name__ == "OptionsError" and str(exc).startswith("sgcache"):
            record.msg = f"{record.getMessage()}: OptionsError: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


@dataclass(frozen=True)
class ReplicaOptions:
    """What the replica is opened with (the addon's ``sgcache_*`` options)."""

    db_url: str
    schema_path: str
    max_lag: float
    read_budget: float  # seconds; 0: no budget
    pairs_path: str | None = None

    def check(self) -> None:
        """Raise :class:`Refused`, naming the option, for a database URL that cannot name a replica
        (unparseable, another database, a driver not installed) or a bad schema or pairs file."""
        problem = url_problem(self.db_url)
        if problem is not None:
            raise Refused(f"sgcache_db: {problem}")
        try:
            Schema.load(self.schema_path)
        except SchemaError as exc:
            raise Refused(f"sgcache_schema: {exc}") from exc
        try:
            load_pairs_file(self.pairs_path or DEFAULT_PAIRS_FILE)
        except PairsError as exc:
            raise Refused(f"sgcache_pairs: {exc}") from exc


class Replica:
    """The open :class:`CacheService` (or None), and the site it serves."""

    def __init__(self, options: ReplicaOptions | None = None, configured_site: sitemod.Site | None = None) -> None:
        self.options = options
        self.configured_site = configured_site
        #: The site served: the configured one, else the one stored in the replica (None: unknown).
        self.site = configured_site
        self.service: CacheService | None = None
        self._retry_at = 0.0
        #: Writes SG answered while no service was open: (method, args), handed to the next one.
        self._unrecorded: list[tuple[str, Any]] = []
        self._every_type = False  # something SG answered may have changed any row (no replica open)
        self._handover = threading.Lock()
        #: relative-date filters: their zone and clock (``sgcache_timezone``; None: they pass)
        self.relative: RelativeDates | None = None
        #: plans each service keeps for reuse (``sgcache_plan_cache``)
        self.plan_cache_size = PLAN_CACHE_SIZE
        #: bytes of answers each service keeps for reuse (``sgcache_answer_cache``)
        self.answer_cache_bytes = ANSWER_CACHE_MB * 1024 * 1024
        #: seconds a write waits for each database step (``sgcache_write_wait``; 0: as long as it takes)
        self.write_wait = WRITE_WAIT_SECONDS

    def serve_relative(self, relative: RelativeDates | None) -> None:
        """Serve relative-date filters with ``relative`` from now on (None: they pass)."""
        self.relative = relative
        if self.service is not None:
            self.service.reader.relative = relative

    def keep_plans(self, size: int) -> None:
        """Keep at most ``size`` plans for reuse from now on (0: none)."""
        self.plan_cache_size = size
        if self.service is not None:
            self.service.reader.plan_cache_size = size

    def keep_answers(self, max_bytes: int) -> None:
        """Keep at most ``max_bytes`` of answers for reuse from now on (0: none; cache/proxy/answercache.py)."""
        self.answer_cache_bytes = max_bytes
        if self.service is not None:
            self.service.inline.answers.resize(max_bytes)

    def wait_for_writes(self, seconds: float) -> None:
        """Have a write wait at most ``seconds`` for each database step from now on (0: as long as
        it takes; cache/proxy/dbwait.py)."""
        self.write_wait = seconds
        if self.service is not None:
            self.service.learner.wait = seconds

    def configure_site(self, url: str) -> None:
        """The site named by ``sgcache_site`` (empty: none, the replica's own is served);
        SiteError for a URL that names no SG site."""
        self.configured_site = sitemod.Site.parse(url) if url.strip() else None
        self.site = self.configured_site

    def reopen(self, options: ReplicaOptions) -> None:
        """Close the replica and open it with ``options`` (start-up, or options changed).

        Raises :class:`Refused` for a database URL that cannot work, a bad schema or pairs file,
        or a replica of another site. A correctly named database that is down is no mistake: the
        proxy runs and passes everything (fail open)."""
        options.check()  # before closing anything: a refused option leaves the replica as it was
        self.close()
        self.options = options
        self.site = self.configured_site  # a site learnt from the previous replica is not this one's
        self._retry_at = 0.0
        try:
            self.open(strict=True)
        except sitemod.SiteMismatch as exc:  # the wrong replica: refuse to start
            raise Refused(str(exc)) from exc

    def open(self, strict: bool = False) -> CacheService | None:
        """Open the replica; when the database is down, pass everything and retry later (fail open).

        The replica must copy the configured site: a mismatch raises :class:`SiteMismatch` when
        ``strict`` (start-up), else it is logged and the replica is not used."""
        options = self.options
        if options is None:
            return None
        try:
            service = CacheService(options.db_url, options.schema_path, options.max_lag,
                                   options.read_budget, pairs_path=options.pairs_path)
            service.reader.relative = self.relative
            service.reader.plan_cache_size = self.plan_cache_size
            service.inline.answers.resize(self.answer_cache_bytes)
            service.learner.wait = self.write_wait
        except Exception as exc:  # noqa: BLE001 - the proxy must run without its database
            self._retry_at = time.monotonic() + RETRY_SECONDS
            # a warning, not an error: mitmdump exits on an error logged during start-up
            # one line (the database error's first): SQLAlchemy's message adds the statement, every retry
            log.warning("sgcache: cannot open the replica %s (%s); passing everything through, retrying in %.0fs",
                        safe_url(options.db_url), redact(short_error(exc), url_secrets(options.db_url)),
                        RETRY_SECONDS)
            return None
        try:
            site = sitemod.resolve(service.store, self.configured_site)
        except sitemod.SiteMismatch as exc:
            service.close()
            self._retry_at = time.monotonic() + RETRY_SECONDS
            if strict:
                raise
            log.error("sgcache: %s; passing everything through", exc)
            return None
        except Exception as exc:  # noqa: BLE001 - database trouble: fail open, try again later
            service.close()
            self._retry_at = time.monotonic() + RETRY_SECONDS
            log.warning("sgcache: cannot read the replica's site %s (%s); passing everything through, "
                        "retrying in %.0fs", safe_url(options.db_url),
                        redact(short_error(exc), url_secrets(options.db_url)), RETRY_SECONDS)
            return None
        if site is not None and self.configured_site is None:
            log.info("sgcache: no sgcache_site set: serving the site stored in the replica, %s", site)
        self.site = site
        with self._handover:
            self.service = service
            deferred, self._unrecorded = self._unrecorded, []
            every_type, self._every_type = self._every_type, False
        for method, args in deferred:
            service.defer(method, args)
        if every_type:
            service.defer_every_type()
        log.info("sgcache: replica %s of %s, schema %s", safe_url(options.db_url), site or "no site yet",
                 options.schema_path)
        return service

    async def current(self, executor: Executor) -> CacheService | None:
        """The service, re-trying to open it (in ``executor``, off the event loop) once its back-off has passed."""
        if self.service is None and time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            await asyncio.get_running_loop().run_in_executor(executor, self.open)
        return self.service

    def defer(self, method: str, args: Any) -> None:
        """A write SG answered that was not learned (no replica open, or it failed): the open
        service, or the next one to open, marks what it could have changed before its next read."""
        with self._handover:
            service = self.service
            if service is None:
                if len(self._unrecorded) <= MAX_UNRECORDED:  # past it, every type is marked anyway
                    self._unrecorded.append((method, args))
                return
        service.defer(method, args)

    def defer_every_type(self) -> None:
        """An upload or a REST API write SG answered may have changed any row: the open service, or
        the next one to open, marks every cached type before its next read."""
        with self._handover:
            service = self.service
            if service is None:
                self._every_type = True
                return
        service.defer_every_type()

    def count(self, reason: str | None) -> None:
        """Count a hit (None) or a pass in the open replica's counters (none while it is closed)."""
        if self.service is not None:
            self.service.count(reason)

    def close(self) -> None:
        """Close the service, if open (the site is kept)."""
        service, self.service = self.service, None
        if service is not None:
            service.close()
