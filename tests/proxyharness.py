"""A real ``mitmdump -s addons/sgcache.py`` subprocess for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .paths import ADDON, REPO
from .wait import wait_until

#: Test-only addon after sgcache: records every answer clients get, for the secret scan.
CAPTURE_ADDON = Path(__file__).resolve().parent / "capture_addon.py"
#: mitmproxy's start line: "HTTP(S) proxy listening at *:8080." or "reverse proxy to URL listening at ...".
_LISTEN_RE = re.compile(r"proxy (?:to \S+ )?listening at \*?([\d.]+|\[?[\w:]+\]?):(\d+)")


def mitmdump_binary() -> str:
    """The mitmdump next to the running interpreter (the test venv), else on PATH."""
    candidate = Path(sys.executable).parent / "mitmdump"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mitmdump")
    if not found:
        raise RuntimeError("mitmdump not found: install the project (pip install -e .[test])")
    return found


#: The read budget of a test's mitmdump unless the test names one (milliseconds).
TEST_READ_BUDGET_MS = 60_000


class Proxy:
    """mitmdump with the sgcache addon (or ``addon``) on an ephemeral loopback port, in mitmproxy's
    ``mode`` (``regular``, or ``reverse:URL``: clients then name the proxy as their site).

    Its output goes to ``workdir/mitmdump.log`` and stays readable with :meth:`output`. ``capture``:
    load the test-only addon that records every answer, and read the output through a pipe as it
    comes (benchmarks turn both off: the output then goes straight to the file, so a busy
    benchmark process never makes mitmdump wait to print); ``prefix``: run mitmdump under this
    command (a profiler: ``python -m cProfile -o FILE``)."""

    def __init__(self, workdir: Path, db_url: str, schema: Path | str, options: Sequence[str] = (),
                 addon: Path = ADDON, mode: str = "regular", capture: bool = True,
                 prefix: Sequence[str] = (), env: Mapping[str, str] | None = None):
        self.workdir = workdir
        self.env = dict(env or {})  # more environment for mitmdump (a benchmark's other checkout)
        self.mode = mode
        self.db_url = db_url
        self.schema = str(schema)
        self.options = list(options)
        self.addon = addon
        self.capture = capture
        self.prefix = list(prefix)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mitmdump.log"
        self.answers_path = workdir / "answers.log"
        self._lines: list[str] = []
        self._lock = threading.Lock()

    @property
    def confdir(self) -> Path:
        return self.workdir / "mitmconf"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def reverse(self) -> bool:
        return self.mode.startswith("reverse:")

    @property
    def address(self) -> str:
        """The ``http_proxy`` value for shotgun_api3 (``host:port``, not a URL)."""
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Proxy:
        self.confdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self.prefix, mitmdump_binary(),
            "--listen-host", "127.0.0.1",
            "--listen-port", str(self.port or 0),
            "--mode", self.mode,
            "--set", f"confdir={self.confdir}",
            "--set", "flow_detail=0",
            "-s", str(self.addon),
            *(["-s", str(CAPTURE_ADDON)] if self.capture else []),
            "--set", f"sgcache_schema={self.schema}",
        ]
        options = list(self.options)
        if not any(o.startswith("termlog_verbosity=") for o in options):
            options.append("termlog_verbosity=debug")
        if not any(o.startswith("sgcache_audit=") for o in options):
            # the audit's shadow reads would reach the fake SG at random: tests that count SG's
            # reads turn it on themselves (tests/test_audit.py)
            options.append("sgcache_audit=0")
        if not any(o.startswith("sgcache_read_budget=") for o in options):
            # the production budget (2 s) makes a read that a loaded machine (CI runs many test
            # processes on two cores) slows down pass as slow-read, as it should; a test that counts
            # hits must not depend on the machine's load. Tests of the budget set their own.
            options.append(f"sgcache_read_budget={TEST_READ_BUDGET_MS}")
        for opt in options:
            cmd += ["--set", opt]
        # the database URL (maybe with a password) comes from the environment, never the command line
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "SGCACHE_DB": self.db_url,
               "SGCACHE_TEST_ANSWERS": str(self.answers_path), **self.env}
        if self.capture:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            threading.Thread(target=self._drain, daemon=True).start()
        else:
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        proc = self.proc
        with contextlib.suppress(AssertionError):
            wait_until(lambda: self._listening_port() is not None or proc.poll() is not None, timeout,
                       "mitmdump to listen")
        self.port = self._listening_port()
        if self.port is None:  # exited, or never listened
            self.stop()
            raise RuntimeError(f"mitmdump did not start:\n{self.output()}")
        return self

    def _listening_port(self) -> int | None:
        for line in self.output().splitlines():
            m = _LISTEN_RE.search(line)
            if m:
                return int(m.group(2))
        return None

    def wait_exit(self, timeout: float = 30.0) -> int | None:
        """Wait for mitmdump to exit by itself (a refused start); its exit status, or None if it still runs."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.log_path, "a", encoding="utf-8") as log_file:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace")
                log_file.write(line)
                log_file.flush()
                with self._lock:
                    self._lines.append(line)

    def output(self) -> str:
        """Everything mitmdump printed so far."""
        if not self.capture:
            return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""
        with self._lock:
            return "".join(self._lines)

    def lines_with(self, text: str) -> list[str]:
        """The lines of the output that contain ``text``."""
        return [line for line in self.output().splitlines() if text in line]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect_status(proxy: Proxy, target: str, timeout: float = 15.0) -> tuple[int, bytes]:
    """Send ``CONNECT target`` to the proxy; (status code, response head and whatever body came)."""
    return _raw_exchange(proxy, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(), timeout)


def plain_status(proxy: Proxy, url: str, timeout: float = 15.0) -> tuple[int, bytes]:
    """Send ``GET <absolute url>`` to the proxy (plain-http proxying); (status code, response bytes)."""
    host = url.split("://", 1)[1].split("/", 1)[0]
    request = f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    return _raw_exchange(proxy, request, timeout)


def _raw_exchange(proxy: Proxy, request: bytes, timeout: float) -> tuple[int, bytes]:
    import socket

    assert proxy.port is not None
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(body) < length and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, head + b"\r\n\r\n" + body
