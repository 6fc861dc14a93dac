"""Every difference between SQLite and PostgreSQL, behind one small interface.

The rest of the code never tests a database's name: it asks the replica's :class:`Dialect`
(``store.dialect``, or :func:`dialect_for` an engine, a connection or a URL). Each database's
module holds all of its differences:

- engines: the URL's driver, the pool, each connection's setup (SQLite: WAL, a busy timeout,
  ``sg_lower``; a writer's transactions begin IMMEDIATE), the proxy's timeouts and its watch on the
  replica file, the ingester's engine options and its leader lock;
- SQL: upserts, the write lock, the database's clock, Unicode ``lower()``, code-point order, a
  long ``in`` list bound as one parameter, the time budget of one read;
- what an error from the database means (:func:`classify_error`: an error names its own database).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .base import BOUND_LIST_TYPES, Dialect, LeaderLock, LockHeld
from .classify import classify_error
from .postgresql import QUERY_CANCELED as PG_QUERY_CANCELED
from .postgresql import PgAdvisoryLock, PostgreSQLDialect, normalize_url
from .sqlite import FileLock, NoLock, SQLiteDialect

__all__ = [
    "BOUND_LIST_TYPES", "POSTGRESQL", "PG_QUERY_CANCELED", "SQLITE", "Dialect", "FileLock", "LeaderLock",
    "LockHeld", "NoLock", "PgAdvisoryLock", "classify_error", "dialect_for", "engine_options",
    "leader_lock_for", "normalize_url", "sequence_key_type", "sqlite_path", "url_problem",
]

SQLITE = SQLiteDialect()
POSTGRESQL = PostgreSQLDialect()
_BY_NAME: dict[str, Dialect] = {d.name: d for d in (SQLITE, POSTGRESQL)}


def dialect_for(source: str | sa.URL | Engine | Connection | Dialect) -> Dialect:
    """The dialect of an engine, a connection or a database URL; ValueError for other databases."""
    if isinstance(source, Dialect):
        return source
    if isinstance(source, Engine | Connection):
        name = source.dialect.name
    else:
        url = sa.engine.make_url(normalize_url(source) if isinstance(source, str) else source)
        name = url.get_backend_name()
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unsupported database {name!r}: sgcache runs on SQLite or PostgreSQL") from None


#: The drivers sgcache runs on, per database.
_DRIVERS = {"sqlite": ("pysqlite",), "postgresql": ("psycopg2",)}
_EXAMPLES = "sqlite:///sgcache.db (a file here), sqlite:////var/lib/sgcache/replica.db or postgresql://user@host/db"


def url_problem(url: str) -> str | None:
    """What is wrong with a replica URL as written (one line, with the fix), or None when it names a
    database sgcache runs on with an installed driver. Never quotes the URL's password."""
    if not url.strip():
        return f"no database URL given; give one such as {_EXAMPLES}"
    if "://" not in url:
        file = "FILE" if "@" in url else url  # never a password
        return (f"{'it' if '@' in url else repr(url)} is not a database URL (no scheme): give sqlite:///{file} "
                f"for a SQLite file (sqlite:////abs/path for an absolute path) or postgresql://user@host/db")
    name = url.split("://", 1)[0].split("+", 1)[0].lower()
    name = "postgresql" if name == "postgres" else name
    if name not in _DRIVERS:
        return f"unsupported database {name!r}: sgcache runs on SQLite or PostgreSQL; give {_EXAMPLES}"
    try:
        parsed = sa.engine.make_url(normalize_url(url))
        driver = parsed.get_driver_name()
    except Exception:  # noqa: BLE001 - SQLAlchemy's words may quote the password: say it in ours
        return (f"cannot parse the {name} URL (check the host, that the port is a number, and %-escape "
                f"special characters in the password); e.g. {_EXAMPLES}")
    if driver not in _DRIVERS[name]:
        return f"unsupported driver {driver!r} for {name}: use {name}:// (driver {_DRIVERS[name][0]})"
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError:
        return (f"the {name} driver {driver} is not installed: pip install 'sgcache[postgres]'"
                if name == "postgresql" else f"the {name} driver {driver} is not installed")
    return None


def sqlite_path(url: str) -> str | None:
    """The file of a file-backed SQLite URL, else None (memory, URI filenames, other databases)."""
    try:
        dialect = dialect_for(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy understands: not ours to judge here
        return None
    return dialect.database_file(url)


def sequence_key_type() -> sa.types.TypeEngine[Any]:
    """A primary key the database numbers itself: SQLite does so only for an ``INTEGER PRIMARY
    KEY`` (the rowid, 64 bits anyway), so the others' BIGINT is INTEGER there."""
    return sa.BigInteger().with_variant(sa.Integer, SQLITE.name)


def leader_lock_for(engine: Engine) -> LeaderLock:
    """The leader lock of an ingester writing through ``engine``."""
    return dialect_for(engine).leader_lock(engine)


def engine_options(url: str) -> dict[str, Any]:
    """``create_engine`` options for an ingester on ``url``."""
    return dialect_for(url).ingester_engine_options()
