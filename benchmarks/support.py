"""Helpers shared by the benchmarks (which import only helper modules, never each other)."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cache.replica.dialect import normalize_url
from cache.replica.store import Store

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


def run_dir(prefix: str) -> Path:
    """A directory for one run's files (a SQLite replica, the processes' logs), removed when the
    benchmark exits; with ``SGCACHE_BENCH_KEEP=1`` kept, and its path printed."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("SGCACHE_BENCH_KEEP") == "1":
        print(f"this run's files: {path}")
    else:
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def fill(store: Store, n: int) -> None:
    """N shots over N/100 sequences, one Task and one Version per Shot."""
    project = {"type": "Project", "id": 1, "name": "Bench"}
    schema = store.schema

    def full(entity_type: str, values: dict[str, Any]) -> dict[str, Any]:
        rec = {f: None for f in schema.entities[entity_type].fields}
        rec.update(values)
        return rec

    statuses = ["ip", "fin", "wtg", "hld"]
    with store.engine.begin() as conn:
        store.write_entities(conn, "Project", [full("Project", {"id": 1, "name": "Bench", "archived": False})],
                             "scan", complete=True)
        store.write_entities(conn, "Sequence", [full("Sequence", {"id": s, "code": f"SQ{s:04d}", "project": project})
                                                for s in range(1, n // 100 + 2)], "scan", complete=True)
    for start in range(1, n + 1, 5000):
        ids = range(start, min(n + 1, start + 5000))
        with store.engine.begin() as conn:
            store.write_entities(conn, "Shot", [full("Shot", {
                "id": i, "code": f"sh{i:06d}", "sg_status_list": statuses[i % 4], "sg_cut_in": 990 + i % 50,
                "sg_cut_out": 1100 + i % 50, "description": f"shot number {i}", "project": project,
                "sg_sequence": {"type": "Sequence", "id": i // 100 + 1, "name": f"SQ{i // 100 + 1:04d}"}})
                for i in ids], "scan", complete=True)
            store.write_entities(conn, "Task", [full("Task", {
                "id": i, "content": "comp", "project": project, "sg_status_list": statuses[i % 4],
                "entity": {"type": "Shot", "id": i, "name": f"sh{i:06d}"}}) for i in ids], "scan", complete=True)
            store.write_entities(conn, "Version", [full("Version", {
                "id": i, "code": f"sh{i:06d}_v001", "project": project,
                "entity": {"type": "Shot", "id": i, "name": f"sh{i:06d}"}}) for i in ids], "scan", complete=True)
    with store.engine.begin() as conn:
        for entity_type in schema.entities:
            store.mark_primed(conn, entity_type)


def pg_url(base: str) -> tuple[str, str] | None:
    """A fresh schema on ``base`` (dropped by :func:`drop_pg`), or None if PostgreSQL is unreachable."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        admin.dispose()
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL unavailable ({exc.__class__.__name__}); skipped")
        return None
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", schema


@contextlib.contextmanager
def bench_replica(db: str | None, tmp: Path) -> Iterator[str]:
    """The replica URL of one benchmark run: a SQLite file in ``tmp`` when ``db`` is None; for a
    PostgreSQL URL that names no ``search_path``, a schema of this run's own, dropped at the end (a
    second run on the same URL would otherwise find the first run's replica, bound to another site)."""
    if db is None:
        yield f"sqlite:///{tmp / 'replica.db'}"
        return
    if not db.startswith("postgresql") or "search_path" in db:
        yield db
        return
    made = pg_url(db)
    if made is None:
        raise SystemExit(f"PostgreSQL at {db.split('@')[-1]} is unreachable")
    try:
        yield made[0]
    finally:
        drop_pg(db, made[1])


def kept_pg(base: str, schema: str) -> str:
    """The URL of schema ``schema`` on ``base``, made if missing and never dropped here."""
    admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    admin.dispose()
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


def drop_pg(base: str, schema: str) -> None:
    admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    admin.dispose()


#: Where a process's CPU can be capped: cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``).
CGROUP_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/cpu"))


class CpuQuota:
    """A cgroup of its own capping one process at ``cores`` of a core (what a container's
    ``--cpus`` does): the benchmarks give each proxy the same share of the machine and measure
    whether the throughput grows with the shares given. Needs a writable cgroup cpu controller
    (root in a container that delegates it); :meth:`available` says whether there is one."""

    PERIOD_US = 100_000

    def __init__(self, cores: float) -> None:
        root = self.root()
        if root is None:
            raise RuntimeError("no writable cgroup cpu controller (cpu.max or cpu.cfs_quota_us)")
        self.path = root / f"sgcache-bench-{uuid.uuid4().hex[:10]}"
        self.path.mkdir()
        quota = max(1000, int(cores * self.PERIOD_US))
        if (self.path / "cpu.max").exists():  # cgroup v2
            (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        else:  # cgroup v1
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    @staticmethod
    def root() -> Path | None:
        """The first cgroup directory with a cpu controller this process may make groups in."""
        for root in CGROUP_ROOTS:
            v2 = (root / "cgroup.controllers").exists() and "cpu" in (root / "cgroup.subtree_control").read_text()
            v1 = (root / "cpu.cfs_quota_us").exists()
            if (v1 or v2) and os.access(root, os.W_OK):
                return root
        return None

    @classmethod
    def available(cls) -> bool:
        return cls.root() is not None

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_seconds(self) -> float:
        """How long the group's processes waited for their quota so far."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def remove(self) -> None:
        """Delete the group (its processes must have exited)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()
