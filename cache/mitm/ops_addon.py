"""The operator's view as a mitmproxy addon: status page, /metrics and /healthz on
``sgcache_status``, one access-log line per API3 request, and the audit's options (cache/ops,
cache/audit). ``addons/sgcache.py`` loads it after :class:`SGCache`, so its hooks see each flow's outcome."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO, Any

from mitmproxy import ctx, exceptions, http

from ..audit.shadow import Audit, AuditOptions
from ..ops.access import FORMATS, RequestRecord, quiet_connections, who
from ..ops.operations import Operations
from ..proxy.flowstate import state_of
from .flows import peer_of

log = logging.getLogger("sgcache.ops")


def lines_as_logged(stream: IO[str] | None = None) -> bool:
    """Make ``stream`` (default: stdout, where mitmdump's log goes) write each line as it is logged.

    Python buffers stdout in 8 kB blocks when it is not a terminal: under systemd (the journal),
    a log shipper or ``| tee``, a warning would show up minutes late, and the last lines before a
    kill never. True when the stream was changed."""
    stream = sys.stdout if stream is None else stream
    if getattr(stream, "line_buffering", True):  # a terminal, or not a text file (pytest's capture)
        return False
    try:
        stream.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError) as exc:
        log.debug("mitmdump's output stays block-buffered: %s", exc)
        return False
    return True


class SGCacheOps:
    """The operator's view (cache/ops): status page, /metrics and /healthz on ``sgcache_status``,
    one access-log line per API3 request. Runs after :class:`SGCache`: its hooks see each flow's outcome."""

    def __init__(self, cache: Any) -> None:
        """``cache``: the SGCache addon (its ``replica`` and ``calls``)."""
        self.ops = Operations(cache.replica)
        self._running = False
        self.audit = Audit(lambda: cache.replica.service, self.ops.metrics.registry, self.ops.observer.label,
                           heard=lambda site, auth, reply: cache.calls.credentials.observe("read", site, auth, reply))
        cache.calls.audit = self.audit
        self.ops.audit = self.audit.rows

    def load(self, loader: Any) -> None:
        lines_as_logged()
        loader.add_option(
            "sgcache_status", str, "",
            "HOST:PORT for the status page (/), Prometheus metrics (/metrics) and the health check "
            "(/healthz), e.g. 127.0.0.1:9180 (empty: off). Each mitmdump process needs its own port.",
        )
        loader.add_option(
            "sgcache_access_log", str, "logfmt",
            "One line per API3 request at info level (method, type, hit/pass and reason, rows, ms, client); "
            "off, logfmt or json. When on, mitmproxy's per-connection lines move to debug.",
            choices=FORMATS,
        )
        self._load_audit(loader)

    def _load_audit(self, loader: Any) -> None:
        """The audit (shadow reads, cache/audit/)."""
        loader.add_option(
            "sgcache_audit", int, 1,
            "Percent of hits (0-100) also read from SG in the background and compared (0: off). "
            "Relative-date hits are all sampled until 100 of them agreed.",
        )
        loader.add_option("sgcache_audit_rate", int, 5,
                          "At most this many audit reads per second are sent to SG (0: no limit).")
        loader.add_option(
            "sgcache_audit_enforce", bool, False,
            "A disagreement switches off the rules the read relied on (their reads pass with reason "
            "audit-disabled) until an operator clears them (sgcache-audit --clear).",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"sgcache_audit", "sgcache_audit_rate", "sgcache_audit_enforce"}:
            o = ctx.options
            if not 0 <= o.sgcache_audit <= 100:
                raise exceptions.OptionsError("sgcache_audit: a percent, 0 to 100")
            if o.sgcache_audit_rate < 0:
                raise exceptions.OptionsError("sgcache_audit_rate: 0 or more")
            self.audit.configure(AuditOptions(o.sgcache_audit, o.sgcache_audit_rate, o.sgcache_audit_enforce))
        if "sgcache_access_log" in updated:
            fmt = ctx.options.sgcache_access_log
            self.ops.observer.access_format = fmt
            quiet_connections(fmt != "off")
            # mitmdump's default one line per flow (flow_detail=1) repeats what the access log says
            if fmt != "off" and "flow_detail" in ctx.options and ctx.options.flow_detail == 1:
                ctx.options.update(flow_detail=0)
        if "sgcache_status" in updated and self._running:
            self.ops.serve(ctx.options.sgcache_status)

    def running(self) -> None:
        self._running = True
        self.ops.serve(ctx.options.sgcache_status)

    def done(self) -> None:
        self.audit.close()
        self.ops.close()
        quiet_connections(False)

    def client_connected(self, client: Any) -> None:
        self.ops.observer.connections(1)

    def client_disconnected(self, client: Any) -> None:
        self.ops.observer.connections(-1)

    def response(self, flow: http.HTTPFlow) -> None:
        state = state_of(flow.metadata)
        # SG answered 5xx: its answer stands, a read's was replaced by the replica's, or a write's
        # by the proxy's "outcome unknown"
        status = state.sg_status
        if status is None and flow.response is not None and not state.answered_here:
            status = flow.response.status_code  # SG's answer, relayed
        if state.method is not None and (status or 0) >= 500:
            self.ops.observer.upstream_error("http-5xx")
        self._finished(flow, "hit" if state.hit else "pass")

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and flow.error is not None:
            state = state_of(flow.metadata)
            if state.method is not None:
                connected = flow.server_conn.timestamp_tcp_setup is not None
                self.ops.observer.upstream_error("dropped" if connected else "connect")
            self._finished(flow, "error")

    def _finished(self, flow: http.HTTPFlow, outcome: str) -> None:
        """Count and log an API3 request the cache decided on (refused destinations are logged apart)."""
        state = state_of(flow.metadata)
        if state.refused is not None or not (state.hit or state.pass_reason is not None):
            return
        args = state.args
        observer = self.ops.observer
        record = RequestRecord(
            method=state.method or "-",
            entity_type=observer.label(args.get("type") if isinstance(args, dict) else None),
            outcome=outcome, reason=None if outcome == "hit" else state.pass_reason, rows=state.rows,
            ms=max(0.0, (time.time() - flow.request.timestamp_start) * 1000),
            status=flow.response.status_code if flow.response is not None else None,
            client=peer_of(flow), who=who(state.auth), service_ms=state.service_ms)
        observer.count(record)
        try:  # logged once the answer is on its way (mitmproxy sends it when this hook returns)
            asyncio.get_running_loop().call_soon(observer.log, record)
        except RuntimeError:  # no event loop running (unit tests): now
            observer.log(record)
