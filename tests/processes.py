"""The project's scripts as processes: one-shot runs (``scripts/scan``) and long-running ones
(``scripts/ingest-events``), with the interpreter running the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .paths import REPO, SCRIPTS
from .secretscan import SCRIPT_OUTPUTS


def script_env(site_url: str, db_url: str, schema: Path, script: str, key: str, **extra: str) -> dict[str, str]:
    """The environment the scripts read their site, credentials, replica and schema from (``extra`` wins)."""
    env = dict(os.environ, SGCACHE_SITE=site_url, SGCACHE_SCRIPT_NAME=script, SGCACHE_SCRIPT_KEY=key,
               SGCACHE_DB=db_url, SGCACHE_SCHEMA=str(schema))
    env.update(extra)
    return env


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/<name>`` with the test interpreter; fail loudly with its output."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    SCRIPT_OUTPUTS.append((f"scripts/{name} {' '.join(args)}", f"{proc.stdout}\n{proc.stderr}"))
    if proc.returncode != 0:
        raise AssertionError(f"scripts/{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class ScriptProcess(subprocess.Popen[bytes]):
    """A running ``scripts/<name>``, its output (stdout and stderr) in ``log_path``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            super().__init__([sys.executable, str(SCRIPTS / name), *args], env=env, cwd=REPO,
                             stdout=log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        """What the process printed so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """Send ``sig`` (if it still runs) and reap it; SIGKILL if it does not stop within ``timeout``."""
        if self.poll() is None:
            self.send_signal(sig)
            try:
                self.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.wait(5)
