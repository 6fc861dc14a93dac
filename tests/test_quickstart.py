"""The README's quickstart, as a new user runs it: a copy of the checkout elsewhere, its first command
line run step by step (a fresh venv, ``pip install -e .``, mitmdump with the addon, which must
listen), then the installed console commands from yet another directory.

To cost seconds, not minutes, the fresh venv is made without pip and borrows the test
interpreter's packages (a ``.pth`` file naming its site-packages: pip, setuptools, wheel and
sgcache's dependencies), and pip installs sgcache alone (``--no-deps --no-build-isolation``). The
venv's ``pip`` and mitmproxy's ``mitmdump`` commands are then missing: two-line stand-ins run the
borrowed modules.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import cache

from .fakesg import FakeSGServer, FakeSite
from .paths import REPO
from .rig import KEY, SCRIPT, populate
from .secretscan import SCRIPT_OUTPUTS
from .wait import wait_until

QUICKSTART_PREFIX = "python3 -m venv .venv && "
CONSOLE_COMMANDS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def quickstart_line() -> str:
    """The README's first command line (the install-and-run quickstart)."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.strip().startswith(QUICKSTART_PREFIX):
            return line.strip()
    raise AssertionError("the README has no quickstart line")


def copy_checkout(dest: Path) -> None:
    """The checkout's files (tracked or new, not ignored): what a fresh clone holds."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                  if p.is_file() and not {".git", ".venv", "__pycache__"} & set(p.parts)]
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no SGCACHE_*, no PYTHONPATH, no active venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SGCACHE_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1", **extra)
    return env


def sh(command: str | list[str], cwd: Path, env: dict[str, str] | None = None,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a shell line (or an argv) as a user would; fail with its output when ``check``."""
    proc = subprocess.run(command, shell=isinstance(command, str), cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=300)
    SCRIPT_OUTPUTS.append((str(command), proc.stdout + proc.stderr))
    if check and proc.returncode != 0:
        raise AssertionError(f"{command} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


class Installed:
    """The copy of the checkout with its .venv, and a directory that is neither."""

    def __init__(self, root: Path):
        self.clone = root / "clone"
        self.elsewhere = root / "elsewhere"
        self.bin = self.clone / ".venv" / "bin"
        self.clone.mkdir()
        self.elsewhere.mkdir()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The quickstart's install steps, run in a copy of the checkout."""
    if not all(importlib.util.find_spec(m) for m in ("pip", "setuptools", "wheel")):
        pytest.skip("pip, setuptools and wheel are needed for pip install --no-build-isolation (the test extra)")
    where = Installed(tmp_path_factory.mktemp("quickstart"))
    copy_checkout(where.clone)
    make_venv, install, run_proxy = quickstart_line().split(" && ")
    assert make_venv == "python3 -m venv .venv" and install == ".venv/bin/pip install -e ."
    sh(shlex.join([sys.executable, "-m", "venv", "--without-pip", ".venv"]), where.clone)
    borrow_packages(where.clone / ".venv")
    stand_in(where.bin / "pip", "import sys\nfrom pip._internal.cli.main import main\nsys.exit(main())")
    sh(f"{install} --no-deps --no-build-isolation -q", where.clone)
    if not (where.bin / "mitmdump").exists():
        stand_in(where.bin / "mitmdump", "from mitmproxy.tools.main import mitmdump\nmitmdump()")
    where.run_proxy = run_proxy  # type: ignore[attr-defined]
    yield where


def stand_in(path: Path, code: str) -> None:
    """A console command of the venv, running ``code`` with the venv's interpreter."""
    path.write_text(f"#!{path.parent / 'python'}\n{code}\n")
    path.chmod(0o755)


def borrow_packages(venv: Path) -> None:
    """Let the fresh venv import the test interpreter's packages (after its own)."""
    site = next((venv / "lib").glob("python3*/site-packages"))
    # every package directory the test interpreter imports from (its venv's, and any it borrows
    # itself), never the checkout: the copy's own sgcache must be the one imported
    paths = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    paths += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    lines = [p for p in dict.fromkeys(paths) if Path(p).is_dir() and Path(p).resolve() != REPO]
    (site / "_sgcache_test_borrowed.pth").write_text("".join(f"{p}\n" for p in lines))


def test_the_quickstart_proxy_listens(installed: Installed, tmp_path: Path) -> None:
    """The README's first line: mitmdump with the addon starts from the checkout and listens."""
    log_path = tmp_path / "mitmdump.log"
    argv = [*shlex.split(installed.run_proxy), "--listen-host", "127.0.0.1", "--listen-port", "0",
            "--set", f"confdir={tmp_path / 'mitm'}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=installed.clone, env=clean_env(PYTHONUNBUFFERED="1"), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        line = wait_until(lambda: next((x for x in log_path.read_text().splitlines() if "proxy listening at" in x),
                                       None) or proc.poll() is not None, 60, "mitmdump to listen",
                          detail=log_path.read_text)
        assert isinstance(line, str), log_path.read_text()
        port = int(line.rsplit(":", 1)[1].rstrip(". \n"))
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        output = log_path.read_text()
        assert "error" not in output.lower() and "Traceback" not in output, output
        assert "no SG site known" in output  # the README's word for a proxy that passes everything
    finally:
        proc.terminate()
        proc.wait(30)
    SCRIPT_OUTPUTS.append(("mitmdump (quickstart)", log_path.read_text()))


def test_every_console_command_answers_help_and_version(installed: Installed) -> None:
    assert {"sgcache-proxy", "sgcache-scan", "sgcache-ingest-events", "sgcache-reprocess",
            "sgcache-schema-dump", "sgcache-schema-filter"} <= set(CONSOLE_COMMANDS)
    for name in CONSOLE_COMMANDS:
        version = sh([str(installed.bin / name), "--version"], installed.elsewhere)
        assert version.stdout.startswith(f"{name} (sgcache) {cache.package_version()}"), version.stdout
        usage = sh([str(installed.bin / name), "--help"], installed.elsewhere)
        assert usage.stdout.startswith(f"usage: {name}"), usage.stdout


def test_a_configuration_error_is_one_line_from_any_directory(installed: Installed, tmp_path: Path) -> None:
    # the default schema (read first) comes from the package: the error is about --db, not --schema
    where = tmp_path / "empty"
    where.mkdir()
    proc = sh([str(installed.bin / "sgcache-scan"), "--db", "sgcache.db"], where, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("sgcache-scan: error: --db (SGCACHE_DB): 'sgcache.db' is not a database URL")
    assert len(proc.stderr.splitlines()) == 1 and list(where.iterdir()) == []
    proxy = sh([str(installed.bin / "sgcache-proxy"), "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--set", f"confdir={tmp_path / 'mitm'}", "--set", "sgcache_db=mysql://cache@dbhost/sg"],
               where, check=False)
    output = proxy.stdout + proxy.stderr
    assert proxy.returncode != 0 and "Traceback" not in output, output
    refusals = [line for line in output.splitlines() if "sgcache_db" in line]
    assert len(refusals) == 1 and "unsupported database 'mysql'" in refusals[0], output


def test_scripts_find_the_checkouts_venv(installed: Installed, tmp_path: Path) -> None:
    """``scripts/scan`` in a fresh shell whose python3 lacks the dependencies re-runs with .venv's."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    bare = subprocess.run([str(base), "-c", "import sqlalchemy, shotgun_api3"], capture_output=True)
    if bare.returncode == 0:
        pytest.skip(f"{base} has sgcache's dependencies: nothing to re-run")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").symlink_to(base)
    env = clean_env(PATH=f"{shims}:/usr/bin:/bin")
    proc = sh([str(installed.clone / "scripts" / "scan"), "--version"], installed.elsewhere, env)
    assert proc.stdout.startswith("sgcache-scan (sgcache) "), proc.stdout + proc.stderr


def readme_command(prefix: str) -> str:
    """The README's command line starting with ``prefix``, without its comment."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith(f"    {prefix}"):
            return line.split("  #", 1)[0].strip()
    raise AssertionError(f"the README has no command line starting with {prefix!r}")


def test_the_readme_commands_against_a_site(installed: Installed) -> None:
    """Build a cached subset, prime, follow: the README's lines, in a shell whose PATH has the
    venv (as the README says), from a directory of their own."""
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    where = installed.elsewhere
    with FakeSGServer(site) as server:
        script = "\n".join([
            "set -e",
            f"cd {shlex.quote(str(installed.clone))}",
            'export PATH="$PWD/.venv/bin:$PATH"',
            f"cd {shlex.quote(str(where))}",
            f"export SGCACHE_SITE={server.url} SGCACHE_SCRIPT_NAME={SCRIPT} SGCACHE_SCRIPT_KEY={KEY}",
            readme_command("export SGCACHE_DB="),
            readme_command("sgcache-schema-dump -o site.yml"),
            readme_command("sgcache-schema-filter site.yml > mine.yml"),
            "export SGCACHE_SCHEMA=$PWD/mine.yml",
            readme_command("sgcache-scan --full") + " --progress-every 0.001",
            "sgcache-ingest-events --once",
        ])
        proc = sh(["bash", "-c", script], where)
    assert "rows by SG's count" in proc.stderr and "rows/s" in proc.stderr, proc.stderr
    assert "caught up (--once)" in proc.stderr, proc.stderr
    assert {"site.yml", "mine.yml", "sgcache.db"} <= {p.name for p in where.iterdir()}
