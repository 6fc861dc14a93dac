"""The docs site builds with MkDocs in strict mode (a broken link or anchor fails), and the reference
names every proxy option and every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .paths import ADDON, REPO, SCRIPTS

DOCS = REPO / "docs"


def test_docs_site_builds_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    assert (tmp_path / "site" / "reference" / "options" / "index.html").exists()


def test_reference_names_every_option_and_command() -> None:
    sources = [ADDON, *sorted((REPO / "cache" / "mitm").glob("*.py"))]  # where the addons declare them
    options = {o for path in sources for o in re.findall(r'add_option\(\s*"(sgcache_\w+)"', path.read_text())}
    assert len(options) >= 10, options
    page = (DOCS / "reference" / "options.md").read_text()
    assert not [o for o in sorted(options) if f"`{o}`" not in page]
    commands = (DOCS / "reference" / "commands.md").read_text()
    assert not [s.name for s in sorted(SCRIPTS.iterdir()) if f"`scripts/{s.name}`" not in commands]


def test_docs_never_point_at_the_design_notes() -> None:
    """Users do not have ../shared: no page of the docs or the README may send them there."""
    pages = [REPO / "README.md", *DOCS.rglob("*.md")]
    assert not [p.name for p in pages if "../shared" in p.read_text()]
