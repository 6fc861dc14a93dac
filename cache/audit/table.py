"""The audit's tables in the replica's database: the newest disagreements, and the rules switched off.

``sgcache_audit`` keeps the newest :data:`KEEP` disagreements (request without credentials, both
answers, time, entity type, rules). ``sgcache_audit_disabled`` holds the rules enforcement switched
off, one row each; deleting a row (``sgcache-audit --clear``) switches the rule on again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

#: Disagreements kept (the newest).
KEEP = 200
#: An answer kept longer than this (characters of JSON) is cut.
MAX_ANSWER = 64 * 1024

def define(md: sa.MetaData) -> tuple[sa.Table, sa.Table]:
    """The two tables in ``md`` (the replica's own metadata defines them too: writers create them)."""
    kept = sa.Table(
        "sgcache_audit", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("entity_type", sa.String(255), nullable=False),
        sa.Column("rules", sa.Text, nullable=False),  # JSON list of "operator rule"
        sa.Column("request", sa.Text, nullable=False),  # JSON: {"who": ..., "method": "read", "params": args}
        sa.Column("cache_answer", sa.Text, nullable=False),
        sa.Column("sg_answer", sa.Text, nullable=False),
    )
    off = sa.Table(
        "sgcache_audit_disabled", md,
        sa.Column("rule", sa.String(64), primary_key=True),
        sa.Column("at", sa.String(32), nullable=False),
        sa.Column("entity_type", sa.String(255), nullable=False),
        sa.Column("audit_id", sa.Integer),
    )
    return kept, off


metadata = sa.MetaData()
audit, disabled = define(metadata)


def create(engine: Any) -> None:
    """Create the tables when missing (a replica made before the audit existed)."""
    metadata.create_all(engine, checkfirst=True)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= MAX_ANSWER else text[:MAX_ANSWER] + "...(cut)"


def record(conn: Any, entity_type: str, rules: Iterable[str], request: Any, cache_answer: Any,
           sg_answer: Any, keep: int = KEEP) -> int:
    """Keep one disagreement (dropping the oldest past ``keep``); its id."""
    result = conn.execute(audit.insert().values(
        at=now(), entity_type=entity_type, rules=json.dumps(sorted(rules)), request=_json(request),
        cache_answer=_json(cache_answer), sg_answer=_json(sg_answer)))
    new_id = int(result.inserted_primary_key[0])
    oldest_kept = conn.execute(sa.select(audit.c.id).order_by(audit.c.id.desc()).offset(keep - 1).limit(1)).scalar()
    if oldest_kept is not None:
        conn.execute(audit.delete().where(audit.c.id < oldest_kept))
    return new_id


def disable(conn: Any, rules: Iterable[str], entity_type: str, audit_id: int | None) -> None:
    """Switch ``rules`` off (those already off stay as they are)."""
    off = set(conn.execute(sa.select(disabled.c.rule)).scalars())
    for rule in sorted(set(rules) - off):
        conn.execute(disabled.insert().values(rule=rule, at=now(), entity_type=entity_type, audit_id=audit_id))


def disabled_rules(conn: Any) -> set[str]:
    return set(conn.execute(sa.select(disabled.c.rule)).scalars())


def latest(conn: Any, n: int = 5) -> list[tuple[str, str, str]]:
    """(time, entity type, rules) of the newest ``n`` disagreements."""
    rows = conn.execute(sa.select(audit.c.at, audit.c.entity_type, audit.c.rules)
                        .order_by(audit.c.id.desc()).limit(n))
    return [(at, t, ", ".join(json.loads(r))) for at, t, r in rows]


def clear(conn: Any, rules: Iterable[str] | None = None) -> int:
    """Switch rules on again (None: all); how many were off."""
    statement = disabled.delete()
    if rules is not None:
        statement = statement.where(disabled.c.rule.in_(list(rules)))
    return int(conn.execute(statement).rowcount or 0)
