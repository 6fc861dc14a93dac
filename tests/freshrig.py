"""The whole freshness path as processes: fake SG server, scan --full, scripts/ingest-events, mitmdump.

Used by tests/test_freshness_e2e.py and benchmarks/bench_freshness.py. The reading client
has its own script credentials, so the fake SG's request log tells its reads (a miss: the
proxy passed the read upstream) from the ingester's polls and fetches.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import shotgun_api3

from .e2e import KEY, SCRIPT, run_script, script_env, site_schema_file
from .fakesg import FakeSGServer, FakeSite
from .proxyharness import REPO, Proxy

READER, READER_KEY = "reader", "r3ader"


class FreshRig:
    """Fake SG + primed replica + a running ingester + the proxy, and a client reading through it."""

    def __init__(self, workdir: Path, db_url: str, site: FakeSite, poll_interval: float = 1.0,
                 ingest_args: tuple[str, ...] = (), schema_rules: str = ""):
        self.workdir, self.db_url, self.site = workdir, db_url, site
        self.schema_rules = schema_rules  # added to the project's rules (e.g. "+EventLogEntry.*")
        self.poll_interval = poll_interval
        # no idle back-off unless asked: the tests and the benchmark measure the poll pipeline
        self.ingest_args = ingest_args if "--idle-max" in ingest_args else (
            *ingest_args, "--idle-max", str(poll_interval))
        self.server: FakeSGServer | None = None
        self.proxy: Proxy | None = None
        self.ingester: subprocess.Popen[bytes] | None = None
        self.schema_path = workdir / "schema.yml"

    def start(self) -> FreshRig:
        self.site.add_script(SCRIPT, KEY)
        self.site.add_script(READER, READER_KEY)
        self.server = FakeSGServer(self.site).start()
        site_schema_file(self.site, self.schema_path, self.schema_rules)
        run_script("scan", "--full", "--quiet", env=self.env())
        log = open(self.workdir / "ingest.log", "wb")  # noqa: SIM115 - owned by the process
        self.ingester = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "ingest-events"), "--poll-interval", str(self.poll_interval),
             *self.ingest_args], env=self.env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.proxy = Proxy(self.workdir, self.db_url, self.schema_path, [f"sgcache_site={self.server.url}"]).start()
        self.sg = shotgun_api3.Shotgun(self.server.url, script_name=READER, api_key=READER_KEY,
                                       http_proxy=self.proxy.address)
        self.sg.find_one("Project", [])  # unseen credentials pass once; SG accepting them enables hits
        return self

    def env(self) -> dict[str, str]:
        assert self.server is not None
        return script_env(self.server, self.db_url, self.schema_path)

    def reader_reads(self) -> int:
        """Reads the fake SG served to the reading client (each one a proxy miss)."""
        with self.site._lock:
            return sum(1 for (name, _p), auth in zip(self.site.requests, self.site.request_auth, strict=True)
                       if name == "read" and isinstance(auth, dict) and auth.get("script_name") == READER)

    def wait_hit(self, query: Callable[[], Any], check: Callable[[Any], bool], timeout: float = 10.0,
                 pause: float = 0.02) -> tuple[float, int]:
        """Run ``query`` through the proxy until ``check`` holds on an answer that was a cache hit.

        Returns (seconds from the call to the first such answer, misses on the way)."""
        start = time.monotonic()
        misses = 0
        while True:
            before = self.reader_reads()
            value = query()
            hit = self.reader_reads() == before
            misses += not hit
            if hit and check(value):
                return time.monotonic() - start, misses
            if time.monotonic() - start > timeout:
                raise AssertionError(f"not visible as a hit after {timeout}s ({misses} misses); last answer "
                                     f"{value!r}\n{self.ingest_log()[-3000:]}")
            time.sleep(pause)

    def ingest_log(self) -> str:
        path = self.workdir / "ingest.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.ingester is not None:
            if self.ingester.poll() is None:
                self.ingester.terminate()
                try:
                    self.ingester.wait(10)
                except subprocess.TimeoutExpired:
                    self.ingester.kill()
                    self.ingester.wait(5)
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> FreshRig:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
