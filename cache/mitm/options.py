"""The options of the cache addon (``SGCache``), declared in its ``load()``: what they mean is in
docs/reference/options.md; how each is checked and applied, in the addon's ``configure()``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..proxy.answercache import ANSWER_CACHE_MB
from ..proxy.auth import MAX_CREDENTIALS
from ..proxy.dbwait import WRITE_WAIT_SECONDS
from ..proxy.memory import MAX_ANSWER_MB
from ..proxy.service import DEFAULT_MAX_LAG
from ..read import READ_BUDGET_SECONDS
from ..read.limits import PLAN_CACHE_SIZE
from ..shipped import basic_schema

#: The replica's URL when ``sgcache_db`` is not given: ``SGCACHE_DB`` keeps a password off the command line.
DEFAULT_DB = "sqlite:///sgcache.db"
DEFAULT_SCHEMA = str(basic_schema())
#: Options that re-open the replica when they change.
REPLICA_OPTIONS = {"sgcache_db", "sgcache_schema", "sgcache_max_lag", "sgcache_read_budget", "sgcache_pairs",
                   "sgcache_site", "mode"}


def declare(loader: Any) -> None:
    """Declare every option of the cache addon (typed, with its default and help)."""
    loader.add_option(
        "sgcache_db", str, os.environ.get("SGCACHE_DB") or DEFAULT_DB,
        f"Replica database URL (SQLAlchemy); default: the SGCACHE_DB environment variable, else {DEFAULT_DB}.",
    )
    loader.add_option("sgcache_schema", str, os.environ.get("SGCACHE_SCHEMA") or DEFAULT_SCHEMA,
                      "Cached-subset schema YAML file; default: the SGCACHE_SCHEMA environment variable, "
                      "else the shipped schema/basic.yml.")
    loader.add_option(
        "sgcache_max_lag", int, int(DEFAULT_MAX_LAG),
        "Serve reads only while the ingester's heartbeat is younger than this many seconds (0: no check). "
        "The ingester beats on every poll, at least every 3 s when idle.",
    )
    loader.add_option(
        "sgcache_read_budget", int, int(READ_BUDGET_SECONDS * 1000),
        "Milliseconds one read may run in the database; a read past it is stopped and passes "
        "(slow-read) without counting as a database failure (0: no budget).",
    )
    loader.add_option(
        "sgcache_write_wait", int, int(WRITE_WAIT_SECONDS * 1000),
        "Milliseconds a write through the proxy waits for the replica's database, before it is sent "
        "and again once SG answered; past it the write goes on, and this proxy's reads of what it "
        "changed pass until the database has taken its markers (0: wait as long as the database takes).",
    )
    loader.add_option("sgcache_auth_ttl", int, 300, "Seconds SG's acceptance of a credential is trusted.")
    loader.add_option(
        "sgcache_auth_cache", int, MAX_CREDENTIALS,
        "Credentials SG accepted remembered at most; past it the closest to expiry are forgotten "
        "(their next read passes once).",
    )
    loader.add_option(
        "sgcache_allow_users", bool, False,
        "Also serve human-user sessions and sudo_as_login (SG filters those by permission rules).",
    )
    loader.add_option(
        "sgcache_scripts", Sequence[str], [],
        "Serve cached answers only to these API script names (repeatable; default: every script "
        "SG accepts). List the scripts whose permission rule set lets them read everything.",
    )
    loader.add_option(
        "sgcache_site", str, os.environ.get("SGCACHE_SITE", ""),
        "The SG site this replica copies (https://studio.shotgunstudio.com; default $SGCACHE_SITE, "
        "else the reverse-proxy target of --mode reverse:URL, else the site stored in the replica). "
        "Only its requests are answered or learned from.",
    )
    loader.add_option(
        "sgcache_hosts", Sequence[str], [],
        "Other hosts to decrypt besides the site's (globs, repeatable); their requests pass "
        "untouched (reason=other-site). TLS to any other host is tunnelled, not decrypted.",
    )
    loader.add_option(
        "sgcache_allow_connect", Sequence[str], [],
        "host:port globs (repeatable) the proxy may connect to besides the site and port 443 "
        "(80 for http://) of non-local hosts, e.g. 'files.studio.internal:8443'.",
    )
    loader.add_option(
        "sgcache_pairs", str, "",
        "SG's paired link fields (YAML, see schema/pairs.yml, the default); pairs learned by "
        "the ingester are added from the database.",
    )
    loader.add_option(
        "sgcache_offline", bool, True,
        "When SG cannot be reached, answer cacheable reads from the replica (marked stale) "
        "and give writes an error naming the outage.",
    )
    declare_relative_dates(loader)
    declare_bounds(loader)


def declare_bounds(loader: Any) -> None:
    """What the proxy keeps in memory (cache/proxy/memory.py)."""
    loader.add_option(
        "sgcache_plan_cache", int, PLAN_CACHE_SIZE,
        "Read plans kept for reuse (the least recently used go first; 0: none). Each costs "
        "tens of kB: this bounds most of the proxy's memory.",
    )
    loader.add_option(
        "sgcache_answer_cache", int, ANSWER_CACHE_MB,
        "MB of encoded answers kept for reuse while the replica is unchanged (0: none).",
    )
    loader.add_option(
        "sgcache_max_answer", int, MAX_ANSWER_MB,
        "MB: a cached answer larger than this passes (large-answer); SG's answers larger than "
        "this are relayed without being read (0: no bound).",
    )


def declare_relative_dates(loader: Any) -> None:
    """Relative-date filters (cache/read/relative.py, docs/semantics.md)."""
    loader.add_option(
        "sgcache_timezone", str, "",
        "IANA time zone (e.g. Europe/London) in which relative-date filters (in_last, in_next, "
        "in_calendar_*) are served; set it to the site's time zone. Empty: they pass to SG.",
    )
    loader.add_option(
        "sgcache_clock", str, "",
        "For tests and replays only: the proxy's time for relative-date filters, stopped at this "
        "ISO 8601 instant (e.g. 2026-03-08T03:30:00Z). Empty: the system clock.",
    )
