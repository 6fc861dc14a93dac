"""``addons/sgcache.py`` loaded as a module, for tests that drive the addon in-process (taddons).

The addon is a mitmproxy script, not a package module: it is loaded from its file once, under a
name of its own, and shared by every test module that needs it.
"""

from __future__ import annotations

import importlib.util

from .paths import ADDON

_spec = importlib.util.spec_from_file_location("sgcache_addon_under_test", ADDON)
assert _spec is not None and _spec.loader is not None
sgcache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sgcache)
