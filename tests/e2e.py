"""Building blocks for end-to-end tests: fake SG + scan + mitmdump + a real client."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import shotgun_api3

from cache.schema import Schema, parse_rules

from .fakesg import FakeSGServer, FakeSite
from .proxyharness import REPO, Proxy
from .secretscan import SCRIPT_OUTPUTS

#: Distinctive secrets: tests/secretscan.py looks for them in every log and answer of the run.
SCRIPT, KEY = "pipeline", "sk-7f3a9c1e-NeverLogMe"
HUMAN, HUMAN_PASSWORD = "ann", "pw-4b8d2e6f-NeverLogMe"
RULES = REPO / "schema" / "basic-filters.txt"
#: Proxy options for a test rig: no ingester heartbeat needed. :func:`primed_rig` adds
#: ``sgcache_site=<the fake server's URL>`` unless the options name a site themselves.
RIG_OPTIONS = ["sgcache_max_lag=0"]


def populate(site: FakeSite) -> None:
    """A small studio: a project, sequences, shots with links, assets."""
    project = site.create_direct("Project", {"name": "Demo"})
    proj = {"type": "Project", "id": project["id"]}
    seqs = [site.create_direct("Sequence", {"code": f"SQ{i:02d}", "project": proj}) for i in (1, 2)]
    assets = [site.create_direct("Asset", {"code": f"asset{i}", "project": proj}) for i in range(3)]
    for i in range(12):
        seq = seqs[i % 2]
        fields: dict[str, Any] = {
            "code": f"sh{i * 10:03d}" if i != 5 else "SH050",
            "project": proj,
            "sg_sequence": {"type": "Sequence", "id": seq["id"]} if i != 7 else None,
            "sg_cut_in": 1001 + i if i != 3 else None,
            "sg_status_list": ["ip", "fin", "wtg"][i % 3],
            "assets": [{"type": "Asset", "id": a["id"]} for a in assets[: i % 4]],
        }
        site.create_direct("Shot", fields)


def populate_with_human(site: FakeSite) -> None:
    """:func:`populate`, plus the human user ``HUMAN`` (password ``HUMAN_PASSWORD``)."""
    populate(site)
    site.add_human(HUMAN, HUMAN_PASSWORD, firstname="Ann", lastname="Lee")


def site_schema_file(site: FakeSite, path: Path, extra_rules: str = "") -> Path:
    """The cached subset of the fake site's schema, made with the project's own rules (plus ``extra_rules``)."""
    rules = RULES.read_text() + "\n" + extra_rules
    schema = Schema.from_schema_read(site.schema).brief().filtered(parse_rules(rules))
    path.write_text(schema.to_yaml(), encoding="utf-8")
    return path


def script_env(server: FakeSGServer, db_url: str, schema: Path) -> dict[str, str]:
    return dict(
        os.environ,
        SGCACHE_SITE=server.url,
        SGCACHE_SCRIPT_NAME=SCRIPT,
        SGCACHE_SCRIPT_KEY=KEY,
        SGCACHE_DB=db_url,
        SGCACHE_SCHEMA=str(schema),
    )


def with_site(options: list[str], server: FakeSGServer) -> list[str]:
    """``options`` plus ``sgcache_site=<server url>``, unless they already name a site."""
    if any(o.startswith("sgcache_site=") for o in options):
        return list(options)
    return [*options, f"sgcache_site={server.url}"]


def run_script(name: str, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/<name>`` with the test interpreter; fail loudly with its output."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    SCRIPT_OUTPUTS.append((f"scripts/{name} {' '.join(args)}", f"{proc.stdout}\n{proc.stderr}"))
    if proc.returncode != 0:
        raise AssertionError(f"scripts/{name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@dataclass
class Rig:
    """A fake SG site, its server, a primed replica and a proxy in front."""

    site: FakeSite
    server: FakeSGServer
    proxy: Proxy
    schema_path: Path
    db_url: str

    def client(self, **kwargs: Any) -> shotgun_api3.Shotgun:
        """A real shotgun_api3 client going through the proxy."""
        kwargs.setdefault("script_name", SCRIPT)
        kwargs.setdefault("api_key", KEY)
        return shotgun_api3.Shotgun(self.server.url, http_proxy=self.proxy.address, **kwargs)

    def direct(self) -> shotgun_api3.Shotgun:
        """A client that talks to the fake SG without the proxy (the oracle)."""
        return shotgun_api3.Shotgun(self.server.url, script_name=SCRIPT, api_key=KEY)

    def env(self) -> dict[str, str]:
        return script_env(self.server, self.db_url, self.schema_path)

    def scan(self, *args: str) -> None:
        run_script("scan", *(args or ("--full",)), "--quiet", env=self.env())

    def reads(self) -> int:
        """How many reads the fake SG has served."""
        return self.site.count("read")


@contextmanager
def primed_rig(
    tmp_path: Path,
    db_url: str,
    options: list[str] | None = None,
    *,
    proxy_db_url: str | None = None,
    populate_site: Callable[[FakeSite], None] = populate,
) -> Iterator[Rig]:
    """A populated fake SG, its server, ``scripts/scan --full`` into ``db_url``, and mitmdump
    in front (on ``proxy_db_url`` when the proxy must reach the database another way)."""
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate_site(site)
    with FakeSGServer(site) as server:
        schema_path = site_schema_file(site, tmp_path / "schema.yml")
        env = script_env(server, db_url, schema_path)
        run_script("scan", "--full", "--quiet", env=env)
        opts = with_site(RIG_OPTIONS if options is None else options, server)
        with Proxy(tmp_path, proxy_db_url or db_url, schema_path, opts) as proxy:
            yield Rig(site, server, proxy, schema_path, db_url)
