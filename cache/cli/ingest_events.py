"""Keep the replica equal to SG by applying its EventLogEntry stream (see cache/ingest/)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from ..config import (
    add_common_args,
    check_db_url,
    command,
    connect_site,
    load_schema,
    open_bound_store,
    setup_logging,
)

log = logging.getLogger("sgcache.ingest")

#: Seconds the ingester may take to stop after SIGTERM before the process ends anyway.
STOP_GRACE_SECONDS = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sgcache-ingest-events", description=__doc__)
    add_common_args(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--follow", dest="follow", action="store_true", default=True,
                      help="poll forever (the default)")
    mode.add_argument("--once", dest="follow", action="store_false",
                      help="apply the events available now, then exit")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="seconds between polls; a change shows through the proxy within about this "
                             "plus 1 s (default 1)")
    parser.add_argument("--idle-max", type=float, default=3.0,
                        help="while no events come, back off to this many seconds between polls "
                             "(default 3; a change on an idle site then shows within about this plus 1 s; "
                             "set it to the poll interval for no back-off)")
    parser.add_argument("--gap-timeout", type=float, default=300.0,
                        help="seconds to wait for a missing event id before giving up on it (default 300)")
    parser.add_argument("--batch", type=int, default=500, help="events per poll (default 500)")
    parser.add_argument("--catch-up-batch", type=int, default=2000,
                        help="events per poll after a full poll, until the end of the stream (a backlog: "
                             "fewer, larger transactions; default 2000)")
    parser.add_argument("--sweep-every", type=int, default=30,
                        help="polls between sweeps for event ids that became visible after their gap was "
                             "given up (default 30; 0: never)")
    parser.add_argument("--sweep-window", type=float, default=None,
                        help="seconds of SG time a sweep looks back (default: twice --gap-timeout)")
    parser.add_argument("--given-up-keep", type=float, default=21600.0,
                        help="seconds of SG time an event id given up as a gap is still looked for by id, "
                             "by every sweep and across restarts (default 21600: six hours)")
    parser.add_argument("--events-keep", type=float, default=2592000.0,
                        help="seconds of SG time the applied events are kept in the replica (sgcache_events, "
                             "which scripts/reprocess replays); older ones are deleted (default 2592000: 30 "
                             "days; 0: keep all)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve Prometheus metrics (events applied, polls, failed polls, leadership) on "
                             "http://HOST:PORT/metrics, e.g. 127.0.0.1:9181 (default: off)")
    parser.add_argument("--lock-retry", type=float, default=1.0,
                        help="PostgreSQL: seconds between attempts to take the leader lock")
    return parser.parse_args(argv)


def stop_on_sigterm(stop: Callable[[str], None], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM calls ``stop`` (the ingester ends its poll, logs its cursor, gives up the lead); a
    process still alive ``grace`` seconds later ends at once. A statement waiting on a PostgreSQL
    server that no longer answers never returns, and a Python signal handler would never run
    meanwhile (libpq waits again when a signal interrupts it): SIGTERM is blocked in this thread,
    and so in every thread started after it, and taken by a thread of its own. Ending mid-poll
    loses nothing: a poll is one transaction, the next ingester resumes at the cursor."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        signal.sigwait({signal.SIGTERM})
        stop("signal SIGTERM")
        threading.Event().wait(grace)
        log.warning("ingester still running %gs after SIGTERM (a poll waiting on the database or SG): "
                    "ending the process", grace)
        logging.shutdown()  # the logs' last lines out first
        os._exit(0)

    threading.Thread(target=watch, name="sigterm", daemon=True).start()


def make_client(args: argparse.Namespace) -> Any:
    sg = connect_site(args)
    sg.config.timeout_secs = 30
    sg.config.rpc_attempt_interval = 500
    return sg


@command("sgcache-ingest-events")
def main(argv: list[str] | None = None) -> int:
    """``sgcache-ingest-events``: exit 0, 2 on a configuration error, 3 when an ingester leads already."""
    args = parse_args(argv)
    setup_logging(args.verbose, args)
    from ..ingest import (  # here: --help and --version need not load SQLAlchemy
        IngestConfig,
        Ingester,
        LockHeld,
        engine_options,
    )

    schema = load_schema(args.schema)
    check_db_url(args.db)
    sg = make_client(args)
    store = open_bound_store(args.db, schema, args.site, **engine_options(args.db))
    config = IngestConfig(batch=args.batch, catch_up_batch=args.catch_up_batch,
                          poll_interval=args.poll_interval,
                          gap_timeout=args.gap_timeout, lock_retry=args.lock_retry,
                          sweep_every=args.sweep_every, sweep_window=args.sweep_window,
                          given_up_keep=args.given_up_keep, events_keep=args.events_keep,
                          idle_max=args.idle_max)
    from ..ops.metrics import IngestMetrics, serve

    metrics = IngestMetrics()
    ingester = Ingester(store, sg, config, metrics=metrics)
    stop_on_sigterm(ingester.stop)  # before the metrics server's thread starts: it inherits the blocked signal
    if args.metrics:
        try:
            serve(args.metrics, metrics.registry, "ingester")
        except (OSError, ValueError) as exc:
            log.error("--metrics %s: %s", args.metrics, exc)
            return 2
    reason: str | None = None
    try:
        ingester.run(follow=args.follow)
        if not args.follow:
            reason = "caught up (--once)"
    except LockHeld as exc:
        log.error("%s", exc)
        reason = "another ingester holds the leader lock"
        return 3
    except KeyboardInterrupt:
        reason = "interrupted (SIGINT)"
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        ingester.log_shutdown(reason)
        ingester.close()
        store.dispose()
    return 0
