"""``scripts/demo`` end to end at a small scale: it prints its table, with cache hits and every write
read back at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .paths import SCRIPTS
from .secretscan import SCRIPT_OUTPUTS


def test_demo_prints_its_table_with_hits(tmp_path: Path, db_url: str) -> None:
    args = ["--shots", "30", "--projects", "2", "--latency", "2", "--rounds", "3", "--changes", "1",
            "--poll-interval", "0.2", "--workdir", str(tmp_path / "demo")]
    env = dict(os.environ, SGCACHE_DEMO_DB=db_url)  # a password stays off the command line
    proc = subprocess.run([sys.executable, str(SCRIPTS / "demo"), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)  # from another directory
    out = f"{proc.stdout}\n{proc.stderr}"
    SCRIPT_OUTPUTS.append(("scripts/demo", out))
    assert proc.returncode == 0, out
    rate = re.search(r"^hit rate\s+-\s+([\d.]+)%$", proc.stdout, re.M)
    assert rate and float(rate.group(1)) > 0, out
    back = re.search(r"^writes read back at once\s+(\d+)/(\d+)\s+(\d+)/(\d+) ", proc.stdout, re.M)
    assert back, out
    assert back.group(1) == back.group(2) == back.group(3) == back.group(4) == "6", out
    assert re.search(r"^change-to-visible lag max\s+-\s+[\d.]+ s$", proc.stdout, re.M), out
