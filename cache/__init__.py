"""sgcache: a caching proxy for the Shotgun API3. The core never imports mitmproxy."""

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else ``__version__`` (a checkout)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8: only the launcher's message runs there
        return __version__
    try:
        return version("sgcache")
    except PackageNotFoundError:
        return __version__
