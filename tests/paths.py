"""Where the project's files are, for tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
ADDON = REPO / "addons" / "sgcache.py"
BASIC_SCHEMA = REPO / "schema" / "basic.yml"
#: The project's rules for the cached subset of a site's schema.
RULES = REPO / "schema" / "basic-filters.txt"
