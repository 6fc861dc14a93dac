"""``scripts/topology``: docs/deploy/compose.yaml's services started as processes (PostgreSQL, the CA, the
prime, the ingester, the scan, two proxies, the balancer reading docs/deploy/haproxy.cfg), and a cached
read through the balancer on each proxy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .databases import pg_base
from .paths import SCRIPTS
from .secretscan import SCRIPT_OUTPUTS


def test_compose_topology_serves_cached_reads_through_the_balancer(tmp_path: Path, backend: str) -> None:
    base = pg_base()
    if base is None:
        pytest.skip("the deployment's database is PostgreSQL: runs with SGCACHE_TEST_DB=postgresql://...")
    workdir = tmp_path / "topology"
    env = dict(os.environ, SGCACHE_TEST_DB=base)  # with its password: kept off the command line
    proc = subprocess.run([sys.executable, str(SCRIPTS / "topology"), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    out = f"{proc.stdout}\n{proc.stderr}"
    SCRIPT_OUTPUTS.append(("scripts/topology", out))
    assert proc.returncode == 0, out
    assert "check: cached reads through the balancer" in proc.stdout, out
    for name in ("proxy1", "proxy2", "ingester", "scan"):
        assert f"{name}: running" in proc.stdout, out
    # the proxies shared the CA the ca service made
    assert (workdir / "mitm" / "mitmproxy-ca.pem").exists()
