"""Secrets: private files, masked URLs and log lines, the secret scan itself, SGCACHE_DB for the addon."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from cache.ingest import FileLock
from cache.private import RedactingFilter, ensure_private_file, redact, safe_url, url_password, url_secrets
from cache.replica.dialect import sqlite_path
from cache.replica.schema import Schema
from cache.replica.store import Store

from . import secretscan
from .paths import BASIC_SCHEMA, REPO
from .rig import Rig
from .sgcache_addon import sgcache

SECRET = "pw-Zq81x/y@z"


@pytest.fixture(params=[0o022, 0o000, 0o277])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_created_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "f"
    ensure_private_file(path)
    assert mode(path) == 0o600


def test_the_sqlite_replica_and_its_wal_are_0600(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "replica.db"
    store = Store.open(f"sqlite:///{path}", Schema.load(BASIC_SCHEMA))
    try:
        with store.write_engine.begin() as conn:
            store.set_state(conn, "probe", "1")
        assert mode(path) == 0o600
        for extra in (Path(f"{path}-wal"), Path(f"{path}-shm")):
            if extra.exists():
                assert mode(extra) & 0o077 == 0, extra
    finally:
        store.dispose()


def test_the_ingester_lock_file_is_0600(tmp_path: Path, umask: int) -> None:
    lock = FileLock(tmp_path / "replica.db.ingest.lock")
    try:
        assert lock.acquire(None)  # type: ignore[arg-type]
        assert mode(lock.path) == 0o600
    finally:
        lock.release()


def test_an_existing_readable_file_keeps_its_mode_with_a_warning(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "old.db"
    path.touch()
    path.chmod(0o644)
    store = Store.open(f"sqlite:///{path}", Schema.load(BASIC_SCHEMA))
    store.dispose()
    assert mode(path) == 0o644
    assert "readable or writable by other users" in caplog.text and str(path) in caplog.text
    quiet = tmp_path / "quiet.db"
    quiet.touch()
    quiet.chmod(0o600)
    caplog.clear()
    Store.open(f"sqlite:///{quiet}", Schema.load(BASIC_SCHEMA)).dispose()
    assert "other users" not in caplog.text


def test_urls_and_texts_are_masked() -> None:
    url = "postgresql://cache:pw-Zq81x%2Fy%40z@db.example:5432/sg?options=-csearch_path%3Dx"
    assert url_password(url) == "pw-Zq81x%2Fy%40z"
    assert safe_url(url) == "postgresql://cache:***@db.example:5432/sg?options=-csearch_path%3Dx"
    assert safe_url("sqlite:///sgcache.db") == "sqlite:///sgcache.db"
    assert url_password("postgresql://cache@db/sg") is None
    text = f"failed for {url} and raw {SECRET}"
    masked = redact(text, [url_password(url)])
    assert "Zq81x" not in masked and masked.count("***") == 2
    assert sqlite_path("sqlite:///x.db") == os.path.abspath("x.db")
    assert sqlite_path("sqlite://") is None and sqlite_path("postgresql://u@h/d") is None


def test_a_password_in_the_query_of_a_database_url_is_masked() -> None:
    """libpq (and so psycopg) takes ``?password=...`` as well as ``user:password@``."""
    url = "postgresql://cache@db.example/sg?sslmode=require&password=pw-Zq81x%26q&sslpassword=k-Zq81x"
    assert safe_url(url) == "postgresql://cache@db.example/sg?sslmode=require&password=***&sslpassword=***"
    assert "Zq81x" not in redact(f"cannot open {url} (pw-Zq81x&q, k-Zq81x)", url_secrets(url))


def test_the_proxy_never_logs_a_database_password_given_in_the_query(tmp_path: Path, db_url: str) -> None:
    """Before: the start-up line, and each failure to open the replica, showed ``?password=`` as it was."""
    with Rig(tmp_path, db_url, proxy=False) as rig:
        proxy = rig.start_proxy(db_url="postgresql://sg@127.0.0.1:1/sg?password=pw-Zq81x-query")
        rig.client().find_one("Project", [])  # passes (no-replica); the proxy retries the database meanwhile
        assert proxy.lines_with("cannot open the replica"), "the failure is logged"
        assert "Zq81x" not in proxy.output()


def test_the_log_filter_masks_messages_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("sgcache.test_private")
    caplog.handler.addFilter(RedactingFilter([SECRET]))
    try:
        logger.warning("cannot connect with %s", SECRET)
        try:
            raise RuntimeError(f"bad password {SECRET}")
        except RuntimeError:
            logger.exception("boom %d%%", 5)
    finally:
        caplog.handler.filters.clear()
    assert SECRET not in caplog.text and "***" in caplog.text and "boom 5%" in caplog.text


def test_the_addon_takes_its_database_from_sgcache_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("SGCACHE_DB", url)
    addon = sgcache.SGCache()
    with taddons.context(addon) as tctx:
        assert tctx.options.sgcache_db == url
        tctx.configure(addon, sgcache_schema=str(BASIC_SCHEMA))
        assert addon.service is not None and (tmp_path / "from-env.db").exists()
        asyncio.run(addon.done())
    monkeypatch.delenv("SGCACHE_DB")
    with taddons.context(sgcache.SGCache()) as tctx:
        assert tctx.options.sgcache_db == "sqlite:///sgcache.db"


def test_a_database_error_never_logs_its_password(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    addon = sgcache.SGCache()

    async def main() -> None:
        with taddons.context(addon) as tctx:
            # a refused port (an outage: logged, the proxy fails open), then URLs SQLAlchemy cannot
            # even parse (a configuration error: the option is refused); none shows the password
            for url in (f"postgresql://cache:{SECRET}@127.0.0.1:1/sg", "postgresql://cache:pw-Zq81x%2Fy%40z@127.0.0.1:1/sg",
                        "postgresql://cache:pw-Zq81x/y@nohost.invalid/sg"):
                tctx.configure(addon, sgcache_db=url, sgcache_schema=str(BASIC_SCHEMA))
                assert addon.service is None
            for url in (f"postgresql://cache:{SECRET}@host:port/sg", f"postgres://cache:{SECRET}@h:5432:1/sg"):
                with pytest.raises(exceptions.OptionsError) as refused:
                    tctx.configure(addon, sgcache_db=url, sgcache_schema=str(BASIC_SCHEMA))
                assert "sgcache_db" in str(refused.value) and "Zq81x" not in str(refused.value)
            await addon.done()

    asyncio.run(main())
    assert "cannot open the replica" in caplog.text
    assert "Zq81x" not in caplog.text


def test_the_secret_scan_finds_a_logged_key(tmp_path: Path) -> None:
    secrets = {"script key": "sk-test-1234", "database password": "p@ss/word"}
    clean = tmp_path / "a" / "mitmdump.log"
    clean.parent.mkdir()
    clean.write_text("[12:00] sgcache: replica postgresql://u:***@h/db\nread pass; reason=stale\n")
    assert secretscan.find_secrets(secrets, secretscan.run_files(tmp_path), [("scan", "ok")]) == []
    leaky = tmp_path / "b" / "mitmdump.log"
    leaky.parent.mkdir()
    leaky.write_text("line one\nparams [{'script_key': 'sk-test-1234'}]\n")
    (tmp_path / "b" / "answers.log").write_text("postgresql://u:p%40ss%2Fword@h/db\n")
    found = secretscan.find_secrets(secrets, secretscan.run_files(tmp_path), [("scripts/scan", "key sk-test-1234")])
    assert f"{leaky}:2: script key" in found
    assert f"{tmp_path / 'b' / 'answers.log'}:1: database password" in found
    assert "scripts/scan:1: script key" in found


def test_the_scan_looks_for_every_secret_the_rig_hands_out() -> None:
    """Every script key and password the e2e rig gives a client or a script is one the scan looks for."""
    from . import rig
    from .conftest import run_secrets

    looked_for = set(run_secrets().values())
    handed_out = {rig.KEY, rig.READER_KEY, rig.HUMAN_PASSWORD, rig.PROXY_PASSWORD}
    assert handed_out <= looked_for
    assert all(len(secret) >= 16 for secret in handed_out)  # distinctive: no chance match in a log


@pytest.mark.parametrize("db", ["postgresql://u:pw-Zq81x@host:port/x", "postgresql://u:pw-Zq81x@127.0.0.1:1/x"])
def test_a_script_never_prints_its_secrets(tmp_path: Path, db: str) -> None:
    env = dict(os.environ, SGCACHE_DB=db, SGCACHE_SITE="http://127.0.0.1:1", SGCACHE_SCRIPT_NAME="s",
               SGCACHE_SCRIPT_KEY="sk-Zq81x-key", SGCACHE_SCHEMA=str(BASIC_SCHEMA))
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "scan"), "--full", "-v"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "error" in output.lower()  # it did fail loudly (a bad URL: one line; a refused connection: a traceback)
    assert "Zq81x" not in output


def test_the_scripts_logging_masks_their_key_and_database_password(tmp_path: Path) -> None:
    code = (
        "import argparse, logging\n"
        "from cache.config import add_common_args, setup_logging\n"
        "p = argparse.ArgumentParser(); add_common_args(p); args = p.parse_args()\n"
        "setup_logging(False, args)\n"
        "logging.getLogger('sgcache.x').error('key %s db %s', args.script_key, args.db)\n"
        "raise RuntimeError('uncaught, with ' + args.db)\n"
    )
    env = dict(os.environ, SGCACHE_DB="postgresql://u:pw-Zq81x%2F@h/x", SGCACHE_SCRIPT_KEY="sk-Zq81x-key",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    output = proc.stdout + proc.stderr
    assert "key *** db postgresql://u:***@h/x" in output and "RuntimeError: uncaught, with" in output
    assert "Zq81x" not in output
