"""The mitmproxy side of the proxy: addon classes and flow helpers that ``addons/sgcache.py``
assembles. The policies they call live in :mod:`cache.proxy`, which never imports mitmproxy."""
