"""The operator's view, without mitmproxy: Prometheus metrics (:mod:`.metrics`), the per-request
access log (:mod:`.access`), the recent-traffic window (:mod:`.recent`), the replica's status and
health (:mod:`.status`), the HTML page (:mod:`.page`) and the small HTTP server that serves them
(:mod:`.server`). The addon feeds :class:`cache.ops.observer.Observer` one record per API3 request;
the sidecars serve their own metrics (``--metrics HOST:PORT``).
"""
