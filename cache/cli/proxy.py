"""``sgcache-proxy``: mitmdump with the sgcache addon, from any directory.

``sgcache-proxy ARGS`` is ``mitmdump -s <the installed addons/sgcache.py> ARGS``: every mitmdump
option and every ``--set sgcache_*`` option is accepted as it is.
"""

from __future__ import annotations

import sys

from .. import package_version
from ..shipped import addon_script

USAGE = """usage: sgcache-proxy [mitmdump options] [--set sgcache_OPTION=VALUE ...]

Run mitmdump with the sgcache addon ({addon}).

sgcache options (--set NAME=VALUE; see the README's "Running it"):
  sgcache_site            the SG site the replica copies (default $SGCACHE_SITE, else the replica's)
  sgcache_db              replica database URL (default $SGCACHE_DB, else sqlite:///sgcache.db)
  sgcache_schema          cached-subset schema YAML (default: the shipped schema/basic.yml)
  sgcache_max_lag, sgcache_read_budget, sgcache_auth_ttl, sgcache_allow_users, sgcache_scripts,
  sgcache_hosts, sgcache_allow_connect, sgcache_pairs, sgcache_offline

Common mitmdump options: --listen-host HOST, --listen-port PORT (default 8080),
--set confdir=DIR (the CA), --set proxyauth=user:password. Every mitmproxy option: mitmdump --help.

  -h, --help     this help
  --version      sgcache's and mitmproxy's versions
"""


def main(argv: list[str] | None = None) -> int | None:
    """Run mitmdump with the addon (returns when it exits)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(USAGE.format(addon=addon_script()))
        return 0
    if args[:1] == ["--version"]:
        from mitmproxy.version import VERSION

        sys.stdout.write(f"sgcache-proxy (sgcache) {package_version()}, mitmproxy {VERSION}\n")
        return 0
    from mitmproxy.tools.main import mitmdump

    return mitmdump(["-s", str(addon_script()), *args])
