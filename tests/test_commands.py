"""The commands' contract, in-process: one line and exit 2 for every configuration error,
``--version`` everywhere, defaults resolved from the package, and scan progress a log can read.

(tests/test_quickstart.py runs the same commands as installed console commands.)"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

import cache
from cache import config, shipped
from cache.cli import audit, dump_data, ingest_events, load_data, proxy, reprocess, scan
from cache.proxy.replica import OneLineRefusal, Refused, ReplicaOptions
from cache.replica.dialect import url_problem
from cache.replica.schema import Schema
from cache.replica.store import Store
from cache.scan import schematools
from cache.scan.progress import TypeProgress, format_duration
from cache.scan.scanner import Scanner

from .fakesg import FakeSite
from .paths import BASIC_SCHEMA, REPO
from .rig import site_schema_file
from .sgcache_addon import sgcache

SITE = "https://studio.shotgunstudio.com"
CREDENTIALS = ["--site", SITE, "--script-name", "sgcache", "--script-key", "k3y"]
#: The commands that open the replica, by their console name.
REPLICA_COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "sgcache-scan": scan.main, "sgcache-ingest-events": ingest_events.main, "sgcache-reprocess": reprocess.main,
}


@pytest.fixture(autouse=True)
def _no_sgcache_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands read SGCACHE_*: none here; and their logging set-up must not outlive the test."""
    for name in config.ENV.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)


def one_error_line(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    """The one line a command wrote on stderr (and nothing on stdout)."""
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.mark.parametrize("prog", sorted(REPLICA_COMMANDS))
@pytest.mark.parametrize("args, option, fix", [
    (["--db", "sgcache.db"], "--db", "sqlite:///sgcache.db"),
    (["--db", "mysql://cache@dbhost/sg"], "--db", "SQLite or PostgreSQL"),
    (["--db", "postgresql://cache:s3cret-pw@dbhost:port/sg"], "--db", "port is a number"),
    (["--db", "postgresql+asyncpg://dbhost/sg"], "--db", "use postgresql://"),
    (["--schema", "no-such-schema.yml"], "--schema", "give a schema YAML file"),
    (["--site", "studio.shotgunstudio.com"], "--site", "https://studio.shotgunstudio.com"),
    (["--site", "ftp://u:s3cret-pw@studio.shotgunstudio.com"], "--site", "must start with http"),
])
def test_a_configuration_error_is_one_line_and_exit_2(prog: str, args: list[str], option: str, fix: str,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [*CREDENTIALS, "--db", f"sqlite:///{tmp_path / 'replica.db'}", *args]
    if prog == "sgcache-ingest-events":
        argv.append("--once")
    assert REPLICA_COMMANDS[prog](argv) == 2
    line = one_error_line(capsys, prog)
    assert f"error: {option}" in line and fix in line and "s3cret" not in line
    assert list(tmp_path.iterdir()) == []  # refused before any database or file was made


@pytest.mark.parametrize("prog", sorted(REPLICA_COMMANDS))
def test_a_database_that_is_down_is_one_log_line_and_exit_1(prog: str, caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A correct URL whose server refuses: no configuration error, no traceback, no password."""
    argv = [*CREDENTIALS, "--db", "postgresql://cache:s3cret-pw@127.0.0.1:1/sg"]
    if prog == "sgcache-ingest-events":
        argv.append("--once")
    assert REPLICA_COMMANDS[prog](argv) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, caplog.text
    assert errors[0].getMessage().startswith("cannot open the replica postgresql://cache:***@127.0.0.1:1/sg: ")
    assert "s3cret" not in caplog.text + "".join(capsys.readouterr())


def test_missing_credentials_name_every_missing_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert scan.main(["--db", "sqlite://", "--site", SITE]) == 2
    line = one_error_line(capsys, "sgcache-scan")
    assert "--script-name (SGCACHE_SCRIPT_NAME)" in line and "--script-key (SGCACHE_SCRIPT_KEY)" in line
    assert "--site" not in line.split("error:", 1)[1].split("missing")[0]
    assert scan.main(["--db", "sqlite://", *CREDENTIALS, "--types", "Shot,Nope"]) == 2
    assert "--types: not cached types: Nope" in one_error_line(capsys, "sgcache-scan")


@pytest.mark.parametrize("args, option, fix", [
    (["--db", "sgcache.db"], "--db", "sqlite:///sgcache.db"),
    (["--db", "postgresql://cache:s3cret-pw@dbhost:port/sg"], "--db", "port is a number"),
    (["--schema", "no-such-schema.yml"], "--schema", "give a schema YAML file"),
    (["--types", "Shot,Nope"], "--types", "not cached types: Nope"),
    (["--db", "sqlite:///nothing-here.db"], "--db", "no replica at"),
])
def test_dump_data_configuration_errors_are_one_line_and_exit_2(args: list[str], option: str, fix: str,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert dump_data.main(["-o", str(tmp_path / "out.jsonl"), *args]) == 2
    line = one_error_line(capsys, "sgcache-dump-data")
    assert f"error: {option}" in line and fix in line and "s3cret" not in line
    assert list(tmp_path.iterdir()) == []  # refused before any database or output file was made


@pytest.mark.parametrize("args, option, fix", [
    (["--db", "sgcache.db"], "--db", "sqlite:///sgcache.db"),
    (["--schema", "no-such-schema.yml"], "--schema", "give a schema YAML file"),
    (["--site", "ftp://u:s3cret-pw@studio.shotgunstudio.com"], "--site", "must start with http"),
])
def test_load_data_configuration_errors_are_one_line_and_exit_2(args: list[str], option: str, fix: str,
                                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "in.jsonl"
    dump.write_text("")
    monkeypatch.chdir(tmp_path)
    assert load_data.main([str(dump), *args]) == 2
    line = one_error_line(capsys, "sgcache-load-data")
    assert f"error: {option}" in line and fix in line and "s3cret" not in line
    assert list(tmp_path.iterdir()) == [dump]


def test_dump_data_from_a_database_that_is_down_is_one_log_line_and_exit_1(
        caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    assert dump_data.main(["--db", "postgresql://cache:s3cret-pw@127.0.0.1:1/sg", "-o", "-"]) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, caplog.text
    assert errors[0].getMessage().startswith("cannot open the replica postgresql://cache:***@127.0.0.1:1/sg: ")
    assert "s3cret" not in caplog.text + "".join(capsys.readouterr())


def test_schema_tools_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert schematools.dump_main(["--site", "ftp://sg", "--script-name", "s", "--script-key", "k"]) == 2
    assert "--site (SGCACHE_SITE): " in one_error_line(capsys, "sgcache-schema-dump")
    assert schematools.dump_main([]) == 2
    assert "--site (SGCACHE_SITE), --script-name" in one_error_line(capsys, "sgcache-schema-dump")
    assert schematools.filter_main(["--rules", str(tmp_path / "none.txt"), str(BASIC_SCHEMA)]) == 2
    assert "error: --rules: cannot read" in one_error_line(capsys, "sgcache-schema-filter")


@pytest.mark.parametrize("main, prog", [
    (scan.main, "sgcache-scan"), (ingest_events.main, "sgcache-ingest-events"),
    (reprocess.main, "sgcache-reprocess"), (schematools.dump_main, "sgcache-schema-dump"),
    (schematools.filter_main, "sgcache-schema-filter"), (proxy.main, "sgcache-proxy"),
    (audit.main, "sgcache-audit"), (dump_data.main, "sgcache-dump-data"), (load_data.main, "sgcache-load-data"),
])
def test_every_command_has_version_and_help(main: Callable[[list[str]], Any], prog: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--version", "--help"):
        try:
            code = main([flag])
        except SystemExit as exc:  # argparse's actions exit
            code = exc.code
        out = capsys.readouterr().out
        assert code in (0, None), (prog, flag)
        assert prog in out and (flag != "--version" or cache.package_version() in out), out


def test_defaults_come_from_the_package_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Path(config.DEFAULT_SCHEMA) == BASIC_SCHEMA and Schema.load(config.DEFAULT_SCHEMA).entities
    assert shipped.pairs_file() == REPO / "schema" / "pairs.yml"
    assert shipped.addon_script() == REPO / "addons" / "sgcache.py"
    assert shipped.shipped("schema/no-such-file.yml") == REPO / "schema" / "no-such-file.yml"


def test_an_installed_wheels_files_are_found_under_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shipped, "SOURCE_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    monkeypatch.setattr(shipped.sysconfig, "get_paths", lambda: {})
    installed = tmp_path / "prefix" / "share" / "sgcache" / "schema" / "basic.yml"
    installed.parent.mkdir(parents=True)
    installed.write_text("entities: {}\n")
    assert shipped.basic_schema() == installed


@pytest.mark.parametrize("url, problem", [
    ("sqlite:///sgcache.db", None), ("sqlite://", None), ("postgres://u@h/db", None),
    ("postgresql://u:p@h:5432/db?options=-csearch_path%3Dsgcache", None),
    ("sgcache.db", "no scheme"), ("user:pw@host/db", "it is not a database URL"), ("", "no database URL"),
    ("mysql://h/db", "unsupported database 'mysql'"), ("oracle+cx://h/db", "unsupported database 'oracle'"),
    ("sqlite+aiosqlite:///x.db", "unsupported driver 'aiosqlite'"),
])
def test_url_problems(url: str, problem: str | None) -> None:
    found = url_problem(url)
    assert (found is None) if problem is None else (problem in (found or "") and "pw" not in (found or ""))


def test_the_proxy_refuses_a_url_that_cannot_work() -> None:
    for url, option in (("sgcache.db", "sgcache_db"), ("mysql://h/db", "sgcache_db")):
        with pytest.raises(Refused, match=f"^{option}: "):
            ReplicaOptions(url, str(BASIC_SCHEMA), 10, 2).check()
    with pytest.raises(Refused, match="^sgcache_schema: cannot read"):
        ReplicaOptions("sqlite://", "nope.yml", 10, 2).check()
    ReplicaOptions("sqlite://", str(BASIC_SCHEMA), 10, 2).check()  # a correct URL is not judged by reaching it


# -- progress ----------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_in_a_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "sgcache.scanner")
    clock = Clock()
    with TypeProgress("Shot", 1000, "log", log_every=30, clock=clock) as progress:
        clock.now += 10
        progress.update(100)  # not yet due
        clock.now += 20
        progress.update(200)
        clock.now += 29
        progress.update(100)  # not due again yet
        clock.now += 1
        progress.update(100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["Shot: 300/1000 rows (30%), 10 rows/s, ETA 1 min 10 s",
                     "Shot: 500/1000 rows (50%), 8 rows/s, ETA 1 min 00 s"]
    assert progress.elapsed() == "1 min 00 s, 8 rows/s"


def test_progress_without_a_total_and_past_it() -> None:
    clock = Clock()
    progress = TypeProgress("Task", None, "log", clock=clock)
    clock.now += 2
    progress.update(10)
    assert progress.line() == "Task: 10 rows, 5 rows/s"
    progress = TypeProgress("Task", 5, "off", clock=clock)
    progress.update(7)  # retired rows come after SG's count of the active ones
    assert progress.line() == "Task: 7 rows, 0 rows/s"
    assert [format_duration(s) for s in (0.4, 59, 61, 7322)] == ["0 s", "59 s", "1 min 01 s", "2 h 02 min"]


def test_progress_bar_total_grows_with_retired_rows() -> None:
    bars: list[Any] = []

    class Bar:
        def __init__(self, **kwargs: Any) -> None:
            self.total, self.n, self.closed = kwargs["total"], 0, False
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def close(self) -> None:
            self.closed = True

    with TypeProgress("Shot", 3, "bar", bar_factory=Bar) as progress:
        progress.update(3)
        progress.update(2)
    assert (bars[0].total, bars[0].n, bars[0].closed) == (5, 5, True)


class CountingClient:
    """find and summarize served by a FakeSite in-process (as shotgun_api3 would call them)."""

    def __init__(self, site: FakeSite, counts: bool = True):
        self.site = site
        self.counts = counts
        self.summarized: list[str] = []

    def find(self, entity_type: str, filters: Any, fields: list[str] | None = None, order: Any = None,
             limit: int = 0, retired_only: bool = False) -> list[dict[str, Any]]:
        rows = self.site.find_direct(entity_type, filters, fields, order, retired_only=retired_only)
        return rows[:limit] if limit else rows

    def summarize(self, entity_type: str, filters: Any, summary_fields: list[dict[str, str]]) -> dict[str, Any]:
        self.summarized.append(entity_type)
        if not self.counts:
            raise RuntimeError("no summarize here")
        return {"summaries": {"id": len(self.site.find_direct(entity_type, filters))}, "groups": []}


@pytest.mark.parametrize("counts", [True, False])
def test_a_full_scan_counts_first_and_logs_its_position(counts: bool, caplog: pytest.LogCaptureFixture,
                                                        tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, "sgcache.scanner")
    site = FakeSite.basic()
    project = site.create_direct("Project", {"name": "P"})
    for i in range(5):
        site.create_direct("Shot", {"code": f"s{i}", "project": {"type": "Project", "id": project["id"]}})
    store = Store.open("sqlite://", Schema.load(site_schema_file(site, tmp_path / "schema.yml", "+Project\n+Shot\n")))
    try:
        client = CountingClient(site, counts)
        scans = Scanner(store, client, page_size=2, progress="log").prime(["Project", "Shot"])
    finally:
        store.dispose()
    assert [s.rows for s in scans] == [1, 5]
    assert client.summarized == ["Project", "Shot"]  # one count per type, answered or not
    lines = [r.getMessage() for r in caplog.records]
    if counts:
        assert "full scan of 2 types, 6 rows by SG's count (Project 1, Shot 5)" in lines
        assert any(line.startswith("1/2 types, 1/6 rows, ETA ") for line in lines), lines
    else:
        assert "full scan of 2 types, 0 rows by SG's count (Project ?, Shot ?)" in lines
    assert any(line.startswith("Shot: 5 rows, 5 new, 0 changed, primed (") and "rows/s)" in line
               for line in lines), lines


def test_the_addon_refuses_a_bad_db_option_and_keeps_its_replica(tmp_path: Path) -> None:
    """Changed while the proxy runs, a URL that cannot work is refused; the replica stays in use."""
    addon = sgcache.SGCache()
    good = f"sqlite:///{tmp_path / 'replica.db'}"

    async def main() -> None:
        with taddons.context(addon) as tctx:
            tctx.configure(addon, sgcache_db=good, sgcache_schema=str(BASIC_SCHEMA), sgcache_site=SITE)
            assert addon.service is not None
            for bad in ("sgcache.db", "mysql://cache@dbhost/sg"):
                with pytest.raises(exceptions.OptionsError, match="^sgcache: sgcache_db: "):
                    tctx.configure(addon, sgcache_db=bad)
                # mitmproxy rolls the option back (and configures the addon with it again)
                assert tctx.options.sgcache_db == good and addon.replica.options.db_url == good
                assert addon.service is not None
            await addon.done()

    asyncio.run(main())
    assert not (tmp_path / "sgcache.db").exists()


def test_a_refused_option_is_one_line_in_mitmdumps_log() -> None:
    try:
        raise exceptions.OptionsError("sgcache: sgcache_db: unsupported database 'mysql'")
    except exceptions.OptionsError:
        record = logging.LogRecord("mitmproxy.addons.script", logging.ERROR, __file__, 1,
                                   "error in script %s", ("addons/sgcache.py",), sys.exc_info())
    assert OneLineRefusal().filter(record) and record.exc_info is None
    assert logging.Formatter().format(record) == (
        "error in script addons/sgcache.py: OptionsError: sgcache: sgcache_db: unsupported database 'mysql'")
    try:
        raise ValueError("a bug")
    except ValueError:
        other = logging.LogRecord("mitmproxy.addons.script", logging.ERROR, __file__, 1, "error", None,
                                  sys.exc_info())
    assert OneLineRefusal().filter(other) and other.exc_info is not None  # a bug keeps its traceback
