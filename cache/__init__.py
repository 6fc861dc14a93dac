"""sgcache: a caching proxy for the Shotgun API3. The core never imports mitmproxy."""

__version__ = "0.1.0"
