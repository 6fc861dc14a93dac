"""The status page: one HTML document an operator reads at a glance, refreshing itself every
:data:`REFRESH_SECONDS` (a ``<meta http-equiv="refresh">``; no script)."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .recent import Window
from .status import ReplicaStatus, this_process

REFRESH_SECONDS = 5
#: Pass reasons listed on the page (the most frequent first).
TOP_REASONS = 8

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .4em;border-bottom:1px solid #ccc}
.ok{color:#0a6d2c;font-weight:600}.bad{color:#b00020;font-weight:600}.dim{color:#777}
table{border-collapse:collapse;margin:.2em 0}td,th{padding:.15em .8em .15em 0;text-align:left;vertical-align:top}
th{font-weight:600;color:#555}td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:2em}.grid>div{min-width:18em}
"""


@dataclass
class PageData:
    """Everything the page shows."""

    status: ReplicaStatus
    recent: Window
    totals_hits: int = 0
    totals_passes: dict[str, int] = field(default_factory=dict)
    version: str = ""
    audit: Sequence[tuple[str, str]] | None = None  # None: the audit is not enabled
    started: float = 0.0  # unix time the proxy started


def render(data: PageData) -> str:
    """The page's HTML."""
    s = data.status
    health = ('<span class="ok">serving reads</span>' if s.healthy
              else f'<span class="bad">passing: {_e(s.problem or "")}</span>')
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>sgcache status</title><style>", _CSS, "</style></head><body>",
        f"<h1>sgcache {_e(data.version)}</h1>",
        f'<p id="health">{health}</p>',
        '<div class="grid"><div>',
        "<h2>Replica</h2>",
        _table([("site", s.site or "none"), ("database", s.db),
                ("ingester heartbeat", _age(s.heartbeat_age)), ("max lag", f"{s.max_lag:g} s" if s.max_lag else "no check"),
                ("newest event applied", _age(s.newest_event_age)),
                ("event cursor / highest", f"{_n(s.event_cursor)} / {_n(s.event_high)}"),
                ("ingester leader", _leader(s.leader)),
                ("database breaker", "open (db-backoff)" if s.breaker_open else "closed")], "replica"),
        "</div><div>",
        f"<h2>Last {data.recent.seconds // 60} minutes</h2>",
        _recent(data.recent),
        "</div></div>",
        '<div class="grid"><div>',
        "<h2>Primed types</h2>",
        _primed(s.primed),
        "</div><div>",
        "<h2>Since start</h2>",
        _table([("hits", str(data.totals_hits)), ("passes", str(sum(data.totals_passes.values())))]
               + [(f"pass: {r}", str(n)) for r, n in sorted(data.totals_passes.items(), key=lambda x: -x[1])],
               "totals"),
        "</div><div>",
        "<h2>Audit</h2>",
        _table(list(data.audit), "audit") if data.audit is not None
        else '<p id="audit" class="dim">audit not enabled</p>',
        "</div></div>",
        f'<p class="dim">served by {_e(this_process())}, up {_duration(time.time() - data.started)}; '
        f"refreshes every {REFRESH_SECONDS} s; <a href=metrics>metrics</a> · <a href=healthz>healthz</a></p>",
        "</body></html>",
    ]
    return "".join(parts)


def _recent(w: Window) -> str:
    rows = [("hit rate (reads)", _rate(w.hit_rate())), ("hits", str(w.total_hits)),
            ("passes", str(w.total_passes))]
    out = _table(rows, "recent")
    types = sorted(set(w.hits) | set(w.passes))
    if types:
        out += "<table id=types><tr><th>type</th><th>hits</th><th>passes</th><th>hit rate (reads)</th></tr>"
        out += "".join(f"<tr><td>{_e(t)}</td><td class=n>{w.hits[t]}</td><td class=n>{w.passes[t]}</td>"
                       f"<td class=n>{_rate(w.hit_rate(t))}</td></tr>" for t in types)
        out += "</table>"
    if w.reasons:
        out += "<table id=reasons><tr><th>top pass reasons</th><th></th></tr>"
        out += "".join(f"<tr><td>{_e(r)}</td><td class=n>{n}</td></tr>" for r, n in w.reasons.most_common(TOP_REASONS))
        out += "</table>"
    return out


def _primed(primed: dict[str, int | None]) -> str:
    if not primed:
        return '<p class="dim">none: every read passes (not-primed)</p>'
    return ("<table id=primed><tr><th>type</th><th>rows</th></tr>"
            + "".join(f"<tr><td>{_e(t)}</td><td class=n>{_n(n)}</td></tr>" for t, n in primed.items())
            + "</table>")


def _table(rows: Sequence[tuple[str, str]], table_id: str) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table id={table_id}>{body}</table>"


def _leader(leader: dict[str, object] | None) -> str:
    if not leader:
        return "none recorded"
    return f"pid {leader.get('pid')} on {leader.get('host')} since {leader.get('since')}"


def _age(seconds: float | None) -> str:
    return "none" if seconds is None else f"{seconds:.1f} s ago"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
