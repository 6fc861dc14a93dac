"""Files shipped with sgcache (the default schema, SG's paired fields, the addon), found from the
package, never from the current directory.

In a checkout or an editable install they sit beside the package (``schema/``, ``addons/``); an
installed wheel carries them as data files under ``<prefix>/share/sgcache/`` (pyproject.toml).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

#: The checkout (or the editable install's source tree) the ``cache`` package lives in.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def _data_roots() -> list[Path]:
    roots = [SOURCE_ROOT]
    for prefix in (sysconfig.get_paths().get("data"), sys.prefix):
        if prefix:
            roots.append(Path(prefix) / "share" / "sgcache")
    return roots


def shipped(relative: str) -> Path:
    """The shipped file ``relative`` (``schema/basic.yml``): the first that exists, else where a
    checkout would hold it (so an error names a real place)."""
    for root in _data_roots():
        candidate = root / relative
        if candidate.is_file():
            return candidate
    return SOURCE_ROOT / relative


def basic_schema() -> Path:
    """The default cached subset, ``schema/basic.yml``."""
    return shipped("schema/basic.yml")


def pairs_file() -> Path:
    """SG's standard paired link fields, ``schema/pairs.yml``."""
    return shipped("schema/pairs.yml")


def basic_rules() -> Path:
    """The project's rules for the default cached subset, ``schema/basic-filters.txt``."""
    return shipped("schema/basic-filters.txt")


def addon_script() -> Path:
    """The mitmproxy addon, ``addons/sgcache.py``."""
    return shipped("addons/sgcache.py")
