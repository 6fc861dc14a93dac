"""Shared fixtures: a fresh replica database per test (or module), on SQLite or PostgreSQL
(tests/databases.py), and the secret scan at the end of the session.

Two collection rules serve CI (.ci/run): the longest modules are collected first, so parallel
workers (pytest-xdist, ``--dist loadfile --no-loadscope-reorder``) start them first and finish
together; and with ``SGCACHE_TEST_DB_ONLY=1`` only the tests that use the replica database run
(the others do not depend on the backend: CI runs them in its SQLite run of each Python).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cache.private import url_password

from . import secretscan
from .databases import finish_drops, fresh_db_url, pg_base
from .fakesg import FakeSite

#: Modules that take longest, started first.
LONGEST_FIRST = ("test_read_differential.py", "test_fuzz.py", "test_concurrent_writes_e2e.py", "test_kill_e2e.py",
                 "test_pg_outage_e2e.py", "test_rw_differential_e2e.py", "test_pairs_e2e.py", "test_oracle.py", "test_failopen.py", "test_e2e_schema_calls.py", "test_large_bodies_e2e.py",
                 "test_topology.py", "test_e2e_bounds.py", "test_ingest_e2e.py",
                 "test_e2e_production.py", "test_site_e2e.py", "test_e2e_spine.py", "test_addon_unit.py",
                 "test_quickstart.py", "test_audit.py", "test_relative_dates.py", "test_events.py",
                 "test_ops_e2e.py", "test_eventlog_e2e.py", "test_dumpload.py", "test_demo.py")
#: The fixtures through which a test uses the replica database (pytest lists them for every test
#: that depends on them, however indirectly).
DATABASE_FIXTURES = {"db_url", "module_db_url", "mode_db_url", "backend"}
#: mitmproxy's modes the end-to-end modules run their proxy in (tests/rig.py).
MODES = ("regular", "reverse")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "proxy_modes(*modes): run this proxy_mode test in these modes only")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using ``proxy_mode`` runs once per mode (module-scoped: one rig per module and mode): in
    the modes its ``proxy_modes`` marker names, else its module's ``PROXY_MODES``, else every mode."""
    if "proxy_mode" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("proxy_modes")
        modes = marker.args if marker is not None else getattr(metafunc.module, "PROXY_MODES", MODES)
        assert set(modes) <= set(MODES), modes
        metafunc.parametrize("proxy_mode", modes, indirect=True, scope="module")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SGCACHE_TEST_DB_ONLY") == "1":
        used = [item for item in items if DATABASE_FIXTURES & set(getattr(item, "fixturenames", ()))]
        if len(used) < len(items):
            kept = set(used)
            config.hook.pytest_deselected(items=[item for item in items if item not in kept])
            items[:] = used

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept


def run_secrets() -> dict[str, str | None]:
    """The distinctive secrets of this test run, by name."""
    from .rig import HUMAN_PASSWORD, KEY, PROXY_PASSWORD, READER_KEY

    base = pg_base()
    return {"script key": KEY, "reader script key": READER_KEY, "human password": HUMAN_PASSWORD,
            "proxy password": PROXY_PASSWORD,
            "database password": url_password(base) if base else None}


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_logs_or_answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no secret in any log file, captured answer or script output."""
    yield
    files = secretscan.run_files(tmp_path_factory.getbasetemp())
    found = secretscan.find_secrets(run_secrets(), files, secretscan.SCRIPT_OUTPUTS)
    assert not found, "secrets leaked:\n" + "\n".join(found[:50])


@pytest.fixture(scope="session", autouse=True)
def databases_dropped() -> Iterator[None]:
    """After the whole run: every database dropped in the background is gone."""
    yield
    left = finish_drops()
    assert not left, f"test databases not dropped: {left}"


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """A database URL for this test alone."""
    with fresh_db_url(tmp_path) as url:
        yield url


@pytest.fixture(scope="module")
def module_db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database URL shared by the tests of one module (for expensive set-ups)."""
    with fresh_db_url(tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(scope="module")
def proxy_mode(request: pytest.FixtureRequest) -> str:
    """The mode of the module's rig: ``regular`` (http_proxy) or ``reverse`` (clients name the proxy)."""
    return str(getattr(request, "param", "regular"))


@pytest.fixture(scope="module")
def mode_db_url(proxy_mode: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database URL shared by the tests of one module in one proxy mode."""
    with fresh_db_url(tmp_path_factory.mktemp(f"db-{proxy_mode}")) as url:
        yield url


@pytest.fixture
def backend() -> str:
    return "postgresql" if pg_base() else "sqlite"


@pytest.fixture
def site() -> FakeSite:
    """The fake SG's basic schema with one script (modules may define their own ``site``)."""
    site = FakeSite.basic()
    site.add_script("pipeline", "s3cret")
    return site
