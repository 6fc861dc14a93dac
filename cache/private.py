"""Keeping secrets out of sight: private files, database URLs and log lines without passwords.

Secrets here are API script keys, user passwords, session tokens and the database password.
The replica (SQLite file) holds the studio's data: it is created readable by its owner only.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("sgcache.private")

MASK = "***"
#: Secrets shorter than this are not masked in free text (too likely to be ordinary words).
MIN_SECRET_CHARS = 4

_warned: set[str] = set()
_warned_lock = threading.Lock()


def open_private(path: str | Path, flags: int = os.O_RDWR) -> int:
    """Open ``path``, creating it mode 0600 whatever the umask. An existing file keeps its mode;
    a warning is logged (once per path) when it is readable by group or others."""
    path = os.fspath(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fd = os.open(path, flags)
        warn_if_readable(path, fd)
        return fd
    os.fchmod(fd, 0o600)  # the umask could have taken bits away, never added any: make it exact
    return fd


def ensure_private_file(path: str | Path) -> None:
    """Create ``path`` empty with mode 0600 when missing (see :func:`open_private`)."""
    os.close(open_private(path, os.O_RDONLY))


def warn_if_readable(path: str, fd: int | None = None) -> None:
    """Log a warning (once per path) when an existing file is group- or world-readable."""
    try:
        mode = os.fstat(fd).st_mode if fd is not None else os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH | stat.S_IWGRP | stat.S_IWOTH):
        with _warned_lock:
            if path in _warned:
                return
            _warned.add(path)
        log.warning("%s is readable or writable by other users (mode %o); consider chmod 600",
                    path, stat.S_IMODE(mode))


def url_password(url: str) -> str | None:
    """The password in a database URL, if any, as written: everything between ``user:`` and the
    last ``@`` (an unquoted ``/`` or ``@`` in a password stays part of it)."""
    if "://" not in url:
        return None
    creds = url.split("://", 1)[1].rpartition("@")[0]
    if ":" not in creds:
        return None
    return creds.split(":", 1)[1] or None


#: Query parameters of a database URL that carry a password (libpq's, MySQL drivers').
SECRET_PARAMS = frozenset({"password", "passwd", "sslpassword"})


def _query_items(url: str) -> list[tuple[str, str]]:
    """A URL's query as written: (key, value) pairs, neither unquoted."""
    query = url.partition("?")[2].partition("#")[0]
    return [(k, v) for k, _, v in (item.partition("=") for item in query.split("&") if item)]


def _secret_param(key: str) -> bool:
    return urllib.parse.unquote_plus(key).strip().lower() in SECRET_PARAMS


def url_secrets(url: str) -> list[str]:
    """Every form of a database URL's password a library may quote in an error (for :func:`redact`):
    the one after ``user:``, and any query parameter that carries one (``?password=...``)."""
    import sqlalchemy as sa  # here: a command's --help need not load SQLAlchemy

    found = [url_password(url)]
    for key, value in _query_items(url):
        if _secret_param(key):
            found += [value, urllib.parse.unquote_plus(value)]
    try:
        found.append(sa.engine.make_url(url).password)  # SQLAlchemy's own reading of an odd URL
    except Exception:  # noqa: BLE001 - unparsable: the form as written is all there is
        pass
    try:
        found.append(urllib.parse.urlsplit(url).password)
    except ValueError:
        pass
    return [str(s) for s in dict.fromkeys(found) if s]


def safe_url(url: str) -> str:
    """A database URL with its password masked (after ``user:``, and in ``?password=...``), for logs and errors."""
    if any(_secret_param(key) for key, _ in _query_items(url)):
        base, _, query = url.partition("?")
        query, hash_, fragment = query.partition("#")
        query = "&".join(f"{key}={MASK}" if _secret_param(key) else f"{key}{sep}{value}"
                         for key, sep, value in (item.partition("=") for item in query.split("&")))
        url = f"{base}?{query}{hash_}{fragment}"
    if url_password(url) is None:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':', 1)[0]}:{MASK}@{host}"


def secret_forms(secrets: Iterable[str | None]) -> list[str]:
    """Each secret as written, URL-quoted and URL-unquoted, longest first (for :func:`redact`)."""
    forms: set[str] = set()
    for secret in secrets:
        if not secret or len(secret) < MIN_SECRET_CHARS:
            continue
        forms.update({secret, urllib.parse.unquote(secret), urllib.parse.quote(secret, safe=""),
                      urllib.parse.quote_plus(secret)})
    return sorted((f for f in forms if len(f) >= MIN_SECRET_CHARS), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every form of every secret replaced by ``***``."""
    return _mask(text, secret_forms(secrets))


def _mask(text: str, forms: list[str]) -> str:
    for form in forms:
        if form in text:
            text = text.replace(form, MASK)
    return text


class RedactingFilter(logging.Filter):
    """A handler filter that masks known secrets in the message and traceback of every record."""

    def __init__(self, secrets: Iterable[str | None] = ()):
        super().__init__()
        self._lock = threading.Lock()
        self._forms: list[str] = secret_forms(secrets)

    def add(self, *secrets: str | None) -> None:
        """Also mask these secrets from now on."""
        with self._lock:
            self._forms = secret_forms([*self._forms, *secrets])

    def filter(self, record: logging.LogRecord) -> bool:
        forms = self._forms
        if not forms:
            return True
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: logging reports it when formatting
            message = str(record.msg)
            record.args = ()
        masked = _mask(message, forms)
        if record.exc_info or record.exc_text:
            # the traceback joins the message: some formatters (mitmproxy's) format exc_info themselves
            trace = record.exc_text or logging.Formatter().formatException(record.exc_info)  # type: ignore[arg-type]
            masked = f"{masked}\n{_mask(trace, forms)}"
            record.exc_info, record.exc_text = None, None
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        if record.stack_info:
            record.stack_info = _mask(record.stack_info, forms)
        return True


def install_redaction(secrets: Iterable[str | None], logger: logging.Logger | None = None) -> RedactingFilter:
    """Mask ``secrets`` in everything the handlers of ``logger`` (default: the root logger) write.

    A filter already installed by this function is reused (its secrets are added to).
    """
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        for existing in handler.filters:
            if isinstance(existing, RedactingFilter):
                existing.add(*secrets)
                break
        else:
            handler.addFilter(RedactingFilter(secrets))
    found = [f for h in logger.handlers for f in h.filters if isinstance(f, RedactingFilter)]
    return found[0] if found else RedactingFilter(secrets)
