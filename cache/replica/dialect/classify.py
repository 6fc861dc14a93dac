"""What an error from the replica means: the pass reason, and whether the database is in trouble.

An error names its own database (a PostgreSQL SQLSTATE, SQLite's message or ``sqlite3.Error``), so
one function reads both.
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from .postgresql import QUERY_CANCELED

#: PostgreSQL error codes that mean the replica's tables are not what the schema says.
_PG_MISSING = {"42P01", "42703", "3F000"}  # undefined table, undefined column, invalid schema
#: Errors that say one statement was too big for the database (its limits, not its health):
#: SQLite's messages, PostgreSQL's SQLSTATE class 54 (program limit exceeded).
_TOO_LARGE_TEXT = ("expression tree is too large", "too many sql variables", "string or blob too big",
                   "too many terms in compound select", "parser stack overflow", "too many columns",
                   "too many arguments on function", "too many fts", "at most 64 tables in a join",
                   "like or glob pattern too complex")  # a 'contains' of over 50,000 bytes


def classify_error(exc: BaseException) -> tuple[str, bool]:
    """(pass reason, whether it counts towards the breaker) for an exception from the replica."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).lower()
    pgcode = getattr(orig, "pgcode", None) or ""
    if pgcode in _PG_MISSING or "no such table" in text or "no such column" in text:
        return "missing-table", False  # the replica's tables are not the schema's: passes, the database is fine
    if pgcode == QUERY_CANCELED:
        return "slow-read", False  # a statement over its time limit: that request's cost, not the database's health
    if pgcode.startswith("54") or any(t in text for t in _TOO_LARGE_TEXT):
        return "too-large", False  # a statement beyond the database's size limits
    if isinstance(orig, ValueError) and "nul (0x00)" in text:
        return "db-query-error", False  # psycopg2 refuses a NUL in a text value: that value's trouble
    if isinstance(orig, OverflowError):
        return "db-query-error", False  # SQLite's driver refuses a number beyond 64 bits: that value's trouble
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            return "db-error", True
        return "db-query-error", False  # this query's trouble (a value out of range, ...), not the database's
    if isinstance(exc, sa.exc.DisconnectionError | sa.exc.TimeoutError | sqlite3.Error | OSError | TimeoutError):
        return "db-error", True
    return "internal-error", False
