"""A seeded differential fuzzer of the read engine: random valid ``find`` calls, the fake SG against the replica.

One site holds the oracle's studio (tests/test_oracle.py ``populate``) plus seeded random rows (ties, case
and Unicode variants of text, None values, empty and long link lists, links to retired entities, archived
projects). The replica is primed from it by the scanner. Each case is a ``read`` as shotgun_api3 sends it
(python-form filters through the library's own translation): random filters of every relation the engine
serves (scalar, entity, multi_entity, deep paths, nested ``any``/``all`` groups, relative dates at a stopped
clock), return fields (deep ones too), sorts, paging, ``retired_only`` and ``include_archived_projects``.

A case holds when the engine passes (:class:`Passthrough`) or answers exactly as the fake SG (entities in
order, paging_info); an answer where the fake SG refuses the read, or any other exception, is a failure.
``SGCACHE_FUZZ_SEED`` and ``SGCACHE_FUZZ_CASES`` pick another run; a failure prints the case to replay.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from shotgun_api3.shotgun import _translate_filters

from cache.errors import Passthrough
from cache.read import Reader, ReplicaState
from cache.read.relative import RelativeDates, fixed_clock, zone_named
from cache.replica.dialect.classify import classify_error
from cache.replica.schema import Schema, parse_rules
from cache.replica.store import Store
from cache.scan.scanner import Scanner

from .fakesg import FakeSite
from .fakesg.site import SGFault
from .replica import SiteClient
from .rig import KEY, SCRIPT
from .test_oracle import RULES, populate

log = logging.getLogger(__name__)

SEED = int(os.environ.get("SGCACHE_FUZZ_SEED", "20261206"))
CASES = int(os.environ.get("SGCACHE_FUZZ_CASES", "3000"))
#: The site's zone and stopped clock (relative dates are served in it); near the data's dates.
ZONE = "Europe/London"
NOW = "2024-02-10T10:30:00Z"
#: The clocks the fuzz test cycles through: NOW, the night London springs forward (01:00 UTC on March
#: 31st), the end of a leap February, a Monday's first minute.
CLOCKS = [NOW, "2024-03-31T00:30:00Z", "2024-03-31T01:30:00Z", "2024-02-29T23:59:59Z", "2024-02-12T00:00:00Z"]

#: Types the calls read, weighted towards those with the most varied data.
TYPES = ["Shot"] * 6 + ["Task"] * 3 + ["Note"] * 2 + ["Version"] * 2 + ["Asset"] * 2 + [
    "Sequence", "Project", "HumanUser", "Group", "Playlist", "PublishedFile", "Step", "ApiUser"]

TEXT_POOL = ["sh010", "SH010", "Sh010", "sh0", "straße", "STRASSE", "Straße", "ß", "ǅemal", "ǆEMAL",
             "İstanbul", "istanbul", "ΣΟΦΟΣ", "σοφος", "Ünïcode ☃", "ünïCODE ☃", "a%b", "a_b", "x\\y",
             "  lead", "trail  ", "", "Hero", "hero", "sq01", "Comp", "comp", "ŉ", "ﬁle", "FILE",
             "a-b", "aB", "a b", "Zebra", "_x", "~t", "é", "E", "10", "9", "🎬 Take", "ẞIG", "\u212a", "\u2126",
             "Ⓐb", "ᏸ", "Ა", "Ǆ"]
DATES = ["2023-12-31", "2024-01-01", "2024-01-31", "2024-02-09", "2024-02-10", "2024-02-11", "2024-02-29",
         "2024-03-01", "2024-12-31", "2024-02-12", "2024-02-18", "2024-03-30", "2024-03-31", "2024-04-01"]
DATETIMES = ["2023-12-31T00:00:00Z", "2024-01-01T00:00:01Z", "2024-01-31T12:00:00Z", "2024-02-09T23:59:59Z",
             "2024-02-10T10:30:00Z", "2024-02-10T00:00:00Z", "2024-02-10T11:00:00Z", "2024-02-29T23:59:59Z",
             "2024-02-17T10:30:00Z", "2024-03-30T00:30:00Z", "2024-03-31T00:59:59Z", "2024-03-31T01:00:00Z",
             "2024-03-30T23:30:00Z", "2024-03-01T00:00:00Z", "2024-02-11T23:59:59Z", "2024-03-31T02:30:00Z"]


def L(entity_type: str, entity_id: int) -> dict[str, Any]:  # noqa: N802 - a link literal
    return {"type": entity_type, "id": entity_id}


# ---------------------------------------------------------------------------------- the site
def add_random_rows(site: FakeSite, rng: random.Random) -> None:
    """Seeded rows on top of the oracle's studio: small value pools, so filters hit and sorts tie."""
    c = site.create_direct
    projects = [L("Project", 1), L("Project", 2), L("Project", 3), None]
    p4 = c("Project", {"name": "ARCHIVE ü 2", "archived": True})
    projects.append(L("Project", p4["id"]))
    seqs = [L("Sequence", i) for i in (1, 2, 3)] + [None]  # 4 is retired
    new_seqs = []
    for _ in range(6):
        made = c("Sequence", {"code": rng.choice(TEXT_POOL + [None]), "project": rng.choice(projects),
                              "sg_status_list": rng.choice(["ip", "fin", "wtg", None]),
                              "description": rng.choice(TEXT_POOL + [None, None])})
        new_seqs.append(L("Sequence", made["id"]))
    seqs += new_seqs
    assets = [L("Asset", i) for i in (1, 2, 3, 5)]  # 4 is retired
    for _ in range(8):
        made = c("Asset", {"code": rng.choice(TEXT_POOL + [None]), "project": rng.choice(projects),
                           "sg_asset_type": rng.choice(["Character", "Prop", "Environment", None]),
                           "parents": rng.sample(assets, rng.randint(0, 2))})
        assets.append(L("Asset", made["id"]))
    shots = []
    for _ in range(40):
        values: dict[str, Any] = {
            "code": rng.choice(TEXT_POOL + [None, None]),
            "description": rng.choice(TEXT_POOL + [None] * 5),
            "sg_status_list": rng.choice(["ip", "fin", "wtg", "rev", "hld", None]),
            "sg_sequence": rng.choice(seqs),
            "project": rng.choice(projects),
            "assets": rng.sample(assets, rng.choice([0, 0, 1, 1, 2, 3, 5])),
            "sg_cut_in": rng.choice([None, 0, 1, -5, 1001, 1001, 1010, 1100]),
            "sg_cut_out": rng.choice([None, 0, 1001, 1100]),
            "sg_cut_duration": rng.choice([None, 0, 10, 100]),
            "sg_frame_rate": rng.choice([None, 0.0, 24.0, 23.976, 25.0, -0.5, 1e-7]),
            "sg_completion": rng.choice([None, 0, 25, 50, 100]),
            "sg_timecode": rng.choice([None, 0, 1, 3600000]),
            "sg_budget": rng.choice([None, 0.0, -1.25, 99.99, 1000.5]),
            "sg_omit": rng.choice([True, False]),
            "sg_due_date": rng.choice(DATES + [None, None]),
            "sg_last_review": rng.choice(DATETIMES + [None, None]),
            "sg_shot_type": rng.choice(["Hero", "Background", "FX", None]),
            "sg_color": rng.choice(["255,0,0", "pipeline_step", "0,0,255", None]),
            "sg_uuid": rng.choice(["0b9a4b56-26c5-4c8f-9a9e-0e6b7d1f0a01", "0B9A4B56-26C5-4C8F-9A9E-0E6B7D1F0A02",
                                   None]),
            "sg_footage": rng.choice(["12-04", "0-01", None]),
            "sg_entity_type": rng.choice(["Shot", "Asset", None]),
            "sg_related": rng.choice([*assets[:6], *seqs[:5], None]),
            "created_by": rng.choice([L("HumanUser", i) for i in (1, 2, 4)] + [None]),
        }
        made = c("Shot", values)
        shots.append(L("Shot", made["id"]))
    users = [L("HumanUser", i) for i in (1, 2, 4)] + [L("Group", i) for i in (1, 2)]
    tasks = []
    for _ in range(25):
        made = c("Task", {"content": rng.choice(TEXT_POOL + [None]),
                          "entity": rng.choice([*shots[:10], *assets[:4], *seqs[:4], None]),
                          "step": rng.choice([L("Step", 1), L("Step", 2), L("Step", 3), None]),
                          "project": rng.choice(projects),
                          "sg_status_list": rng.choice(["ip", "fin", None]),
                          "task_assignees": rng.sample(users, rng.choice([0, 1, 1, 2, 3])),
                          "start_date": rng.choice(DATES + [None]), "due_date": rng.choice(DATES + [None]),
                          "duration": rng.choice([None, 0, 480, 960]),
                          "sg_priority": rng.choice(["1", "2", "3", None])})
        tasks.append(L("Task", made["id"]))
    for _ in range(12):
        c("Note", {"subject": rng.choice(TEXT_POOL + [None]), "project": rng.choice(projects),
                   "user": rng.choice(users[:3] + [None]),
                   "note_links": rng.sample([*shots[:12], *assets[:5], *seqs[:4]], rng.choice([0, 1, 2, 4])),
                   "tasks": rng.sample(tasks, rng.choice([0, 1, 2])),
                   "addressings_to": rng.sample(users, rng.choice([0, 1, 2])),
                   "sg_status_list": rng.choice(["opn", "clsd", None])})
    for _ in range(10):
        c("Version", {"code": rng.choice(TEXT_POOL + [None]), "project": rng.choice(projects),
                      "entity": rng.choice([*shots[:10], *assets[:4], None]),
                      "sg_task": rng.choice([*tasks[:8], None]), "user": rng.choice(users[:3] + [None]),
                      "sg_first_frame": rng.choice([None, 1, 1001])})
    # retire some of the new rows, some linked from others
    for link in rng.sample(shots, 5) + rng.sample(assets[5:], 2) + rng.sample(new_seqs, 2) + rng.sample(tasks, 3):
        site.delete_direct(link["type"], link["id"])


def make_site(rng: random.Random) -> FakeSite:
    """The oracle's studio plus :func:`add_random_rows`, its clock stopped at NOW in ZONE."""
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    add_random_rows(site, rng)
    site.timezone = ZONE
    site.set_clock(_parse(NOW))
    return site


def _parse(text: str) -> datetime:
    """A wire date_time as an aware UTC datetime."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------- the generator
@dataclass
class Pools:
    """What the generator draws from: the cached schema and the values the site holds."""

    schema: Schema
    values: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    links: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def dtype(self, entity_type: str, name: str) -> str | None:
        """The data type of a cached field (None: not cached)."""
        if name == "id":
            return "number"
        spec = self.schema.field(entity_type, name)
        return spec.data_type if spec is not None else None

    def fields(self, entity_type: str) -> list[str]:
        """The cached fields of a type, ``id`` first."""
        return ["id", *[f for f in self.schema.entities[entity_type].fields if f != "id"]]

    def valid_types(self, entity_type: str, name: str) -> list[str]:
        """The cached types a link field can hold."""
        spec = self.schema.field(entity_type, name)
        types = list(spec.links) if spec is not None else []
        return [t for t in types if t in self.schema.entities]


def gather(site: FakeSite, schema: Schema) -> Pools:
    """Every value (and link, and link name) the site holds in each cached field, active and retired rows."""
    pools = Pools(schema)
    for entity_type, entity in schema.entities.items():
        rows = []
        for retired in (False, True):
            rows += site.find_direct(entity_type, [], list(entity.fields), retired_only=retired)
        pools.links[entity_type] = [L(entity_type, r["id"]) for r in rows] + [L(entity_type, 9999)]
        for name in entity.fields:
            seen: list[Any] = []
            for r in rows:
                v = r.get(name)
                if isinstance(v, dict) and "id" in v:
                    v = L(v["type"], v["id"])
                    if v.get("type") in schema.entities and v not in seen:
                        pools.names.append(r.get(name, {}).get("name") or "")
                if isinstance(v, list | dict) and not (isinstance(v, dict) and "id" in v):
                    continue
                if v not in seen:
                    seen.append(v)
            pools.values[(entity_type, name)] = seen
    pools.names = sorted(set(pools.names))
    return pools


class Gen:
    """Random ``find`` calls over the cached schema, in shotgun_api3's python form."""

    def __init__(self, rng: random.Random, pools: Pools):
        self.rng, self.p = rng, pools

    # -- paths
    def path(self, entity_type: str, depth: int = 2, for_filter: bool = True) -> tuple[str, str, str]:
        """A (deep) path, its final type and data type; mostly one the engine can filter (sort) on."""
        avoid = ("serializable", "url", "tag_list", "image") + (() if for_filter else ("multi_entity",))
        for _ in range(3):
            found = self._path(entity_type, depth)
            if found[2] not in avoid or self.rng.random() < 0.1:
                break
        return found

    def _path(self, entity_type: str, depth: int) -> tuple[str, str, str]:
        rng = self.rng
        fields = [f for f in self.p.fields(entity_type) if self.p.dtype(entity_type, f) is not None]
        name = rng.choice(fields)
        dt = self.p.dtype(entity_type, name) or "text"
        if dt in ("entity", "multi_entity") and depth > 0 and rng.random() < 0.45:
            targets = self.p.valid_types(entity_type, name)
            if targets:
                target = rng.choice(targets)
                rest, final_type, final_dt = self._path(target, depth - 1)
                return f"{name}.{target}.{rest}", final_type, final_dt
        return name, entity_type, dt

    # -- values
    def text(self, entity_type: str, name: str) -> str | None:
        rng = self.rng
        pool = [v for v in self.p.values.get((entity_type, name), []) if isinstance(v, str)]
        v = rng.choice(pool) if pool and rng.random() < 0.7 else rng.choice(TEXT_POOL)
        roll = rng.random()
        if roll < 0.2:
            v = v.upper()
        elif roll < 0.35:
            v = v.lower()
        elif roll < 0.45:
            v = v.swapcase()
        return v

    def piece(self, text: str | None) -> str:
        """A substring (start, middle or end) of ``text``."""
        if not text:
            return self.rng.choice(["", "o", "ü", "_", "%"])
        i = self.rng.randint(0, len(text) - 1)
        j = self.rng.randint(i + 1, len(text))
        return text[i:j]

    def scalar(self, entity_type: str, name: str, dt: str) -> Any:
        rng = self.rng
        pool = [v for v in self.p.values.get((entity_type, name), []) if v is not None]
        if dt == "text":
            return self.text(entity_type, name)
        if dt == "checkbox":
            return rng.choice([True, False])
        if pool and rng.random() < 0.75:
            v = rng.choice(pool)
            if dt in ("number", "float", "currency") and not isinstance(v, bool) and rng.random() < 0.1:
                v = float(v) if isinstance(v, int) else int(v)  # 1001.0 for a number, 24 for a float
            return v
        if dt in ("number", "duration", "percent", "timecode"):
            return rng.choice([0, 1, -5, 10, 50, 1001, 1005, 3600000, 2**31, -(2**63), 2**63])
        if dt in ("date", "date_time") and rng.random() < 0.1:  # the right shape, not on the calendar
            return rng.choice(["2024-02-30", "2023-13-01"]) if dt == "date" else "2024-02-10T24:00:00Z"
        if dt in ("float", "currency"):
            return rng.choice([0.0, 24.0, 23.976, -1.25, 99.99, 1e-7, 25.0])
        if dt == "date":
            return rng.choice(DATES)
        if dt == "date_time":
            return rng.choice(DATETIMES)
        if dt in ("list", "status_list"):
            return rng.choice(["ip", "IP", "fin", "Hero", "hero", "Prop", "1", "act"])
        return rng.choice(["Shot", "shot", "255,0,0", "12-04", "x"])

    def link(self, entity_type: str, name: str) -> dict[str, Any] | None:
        types = self.p.valid_types(entity_type, name)
        if not types or self.rng.random() < 0.1:
            return None
        if self.rng.random() < 0.05:
            types = ["Version", "Project"]  # a link of a type the field cannot hold
        link = dict(self.rng.choice(self.p.links[self.rng.choice(types)]))
        if self.rng.random() < 0.3:
            link["name"] = self.rng.choice(self.p.names or ["x"])  # the client sends what it has
        return link

    # -- conditions
    def condition(self, entity_type: str) -> list[Any]:
        """One condition in python form: a (deep) path, a relation its data type has, values for it."""
        rng = self.rng
        path, final_type, dt = self.path(entity_type)
        name = path.rsplit(".", 1)[-1]
        if dt in ("entity", "multi_entity"):
            relation = rng.choice(["is", "is_not", "in", "not_in", "type_is", "type_is_not", "name_is",
                                   "name_contains", "name_not_contains", "name_starts_with", "name_ends_with"])
            if relation in ("is", "is_not"):
                return [path, relation, self.link(final_type, name)]
            if relation in ("in", "not_in"):
                n = rng.randint(1, 4) if rng.random() < 0.92 else 45
                return [path, relation, [self.link(final_type, name) for _ in range(n)]]
            if relation.startswith("type_"):
                types = self.p.valid_types(final_type, name)
                return [path, relation, rng.choice([*types, None, "Version"])]
            base = rng.choice(self.p.names) if self.p.names else "x"
            value = base if relation == "name_is" else self.piece(base)
            return [path, relation, rng.choice([value, value.upper(), value.lower()])]
        if dt in ("serializable", "url", "tag_list", "image"):
            return [path, "is", None]
        ordered = dt in ("number", "duration", "percent", "timecode", "float", "currency", "date", "date_time")
        relations = ["is", "is_not", "in", "not_in"]
        if ordered:
            relations += ["less_than", "greater_than", "between", "not_between"]
        if dt == "text":
            relations += ["contains", "not_contains", "starts_with", "ends_with"] * 2
        if dt in ("date", "date_time"):
            relations += ["in_last", "not_in_last", "in_next", "not_in_next", "in_calendar_day",
                          "in_calendar_week", "in_calendar_month", "in_calendar_year"]
        relation = rng.choice(relations)

        def value() -> Any:
            return None if rng.random() < 0.12 else self.scalar(final_type, name, dt)
        if relation in ("is", "is_not"):
            return [path, relation, value()]
        if relation in ("in", "not_in"):
            values = [value() for _ in range(rng.randint(1, 4))]
            if rng.random() < 0.08:  # past MAX_INLINE_VALUES: one bound parameter
                values += [self.scalar(final_type, name, dt) for _ in range(40)]
            return [path, relation, values]
        if relation in ("less_than", "greater_than"):
            return [path, relation, self.scalar(final_type, name, dt)]
        if relation in ("between", "not_between"):
            lo, hi = sorted([self.scalar(final_type, name, dt), self.scalar(final_type, name, dt)],
                            key=lambda v: (str(type(v)), v))
            pair = [lo, hi] if rng.random() < 0.8 else rng.choice([[None, hi], [lo, None], [hi, lo]])
            return [path, relation, pair]
        if relation.startswith("in_calendar_"):
            return [path, relation, rng.choice([-1, 0, 1, 2])]
        if relation in ("in_last", "not_in_last", "in_next", "not_in_next"):
            return [path, relation, rng.choice([1, 2, 7, 30]), rng.choice(["HOUR", "DAY", "WEEK", "MONTH", "YEAR"])]
        return [path, relation, self.piece(self.text(final_type, name))]

    def filters(self, entity_type: str, depth: int = 0) -> list[Any]:
        """Zero to three conditions, some of them nested ``all``/``any`` groups (two levels at most)."""
        rng = self.rng
        out: list[Any] = []
        for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3])):
            if depth < 2 and rng.random() < 0.2:
                out.append({"filter_operator": rng.choice(["all", "any"]),
                            "filters": self.filters(entity_type, depth + 1) or [self.condition(entity_type)]})
            else:
                out.append(self.condition(entity_type))
        return out

    # -- the call
    def call(self) -> dict[str, Any]:
        """One ``read``'s params, as shotgun_api3's ``find`` builds them."""
        rng = self.rng
        entity_type = rng.choice(TYPES)
        filters = self.filters(entity_type)
        op = rng.choice(["all", "all", "any"])
        if not filters and op == "any":
            op = "all"
        fields = [self.path(entity_type, for_filter=rng.random() < 0.5)[0] for _ in range(rng.randint(0, 5))]
        if fields and rng.random() < 0.1:
            fields += [rng.choice(fields), "type", "id"]  # duplicates, and the fields every entity has
        wire = _translate_filters(filters, op)
        if rng.random() < 0.03:  # an empty list: only the wire form (or ``id``) can send one
            wire["conditions"].append({"path": self.path(entity_type)[0], "relation": rng.choice(["in", "not_in"]),
                                       "values": []})
        params: dict[str, Any] = {
            "type": entity_type, "return_fields": fields or ["id"],
            "filters": wire,
            "return_only": "retired" if rng.random() < 0.1 else "active",
            "paging": {"entities_per_page": rng.choice([1, 2, 3, 5, 500]),
                       "current_page": rng.choice([1, 1, 1, 2, 3, 4])},
            "api_return_image_urls": True,
            "return_paging_info": rng.random() < 0.3,
        }
        if rng.random() < 0.25:
            params["include_archived_projects"] = False
        if rng.random() < 0.6:
            params["sorts"] = [{"field_name": self.path(entity_type, for_filter=False)[0],
                                "direction": rng.choice(["asc", "desc"])} for _ in range(rng.randint(1, 3))]
        return params


# ---------------------------------------------------------------------------------- running
@dataclass
class Replica:
    """The fake SG, the replica primed from it, the reader over it, and the generator's pools."""

    site: FakeSite
    store: Store
    reader: Reader
    pools: Pools


@pytest.fixture(scope="module")
def replica(module_db_url: str) -> Iterator[Replica]:
    """One seeded site and its replica for the module (the tests only read, or restore what they change)."""
    site = make_site(random.Random(SEED))
    built = build_replica(site, module_db_url)
    yield built
    built.store.dispose()


def build_replica(site: FakeSite, url: str) -> Replica:
    """A replica of ``site`` at ``url``, primed by the scanner, its reader's clock at NOW."""
    schema = Schema.from_schema_read(site.schema).brief().filtered(parse_rules(RULES)).cacheable()
    store = Store.open(url, schema)
    Scanner(store, SiteClient(site)).prime(sorted(store.schema.entities))
    reader = Reader(store)
    reader.relative = RelativeDates(zone_named(ZONE), fixed_clock(NOW))
    return Replica(site, store, reader, gather(site, schema))


Outcome = tuple[str, Any]


def set_clock(replica: Replica, now: str) -> None:
    """Stop the fake SG's clock and the engine's at ``now`` (relative dates)."""
    replica.site.set_clock(_parse(now))
    replica.reader.relative = RelativeDates(zone_named(ZONE), fixed_clock(now))


def run_case(replica: Replica, params: dict[str, Any]) -> tuple[Outcome, Outcome]:
    """(the fake SG's outcome, the engine's): ``("answer", results)``, ``("error", message)`` or
    ``("pass", reason)``."""
    try:
        expected: Outcome = ("answer", replica.site._direct("read", json.loads(json.dumps(params)), False))
    except SGFault as exc:
        expected = ("error", exc.message)
    with replica.store.engine.connect() as conn:
        state = ReplicaState(replica.store.primed_fields(conn))
        try:
            got: Outcome = ("answer", replica.reader.read(conn, json.loads(json.dumps(params)), state))
        except Passthrough as exc:
            got = ("pass", exc.reason)
        except Exception as exc:  # noqa: BLE001 - as the proxy does (CacheService.read): a database's refusal passes
            reason, _trips = classify_error(exc)
            if reason == "internal-error":
                raise
            got = ("pass", reason)
    return expected, got


def wrong(expected: Outcome, got: Outcome) -> bool:
    """Whether the engine's outcome breaks the promise: an answer that is not SG's."""
    return got[0] == "answer" and got != expected


def describe(params: dict[str, Any], expected: Outcome, got: Outcome) -> str:
    """A failing case, to replay: the read and both outcomes."""
    return (f"read {json.dumps(params, ensure_ascii=False)}\n  fake SG: {json.dumps(expected, ensure_ascii=False)}"
            f"\n  engine:  {json.dumps(got, ensure_ascii=False)}")


def test_random_reads_answer_as_sg_or_pass(replica: Replica) -> None:
    """Thousands of seeded random reads: each one passes or equals the fake SG's answer."""
    gen = Gen(random.Random(SEED + 1), replica.pools)
    failures: list[str] = []
    counts = {"hit": 0, "pass": 0, "error": 0, "rows": 0}
    for i in range(CASES):
        set_clock(replica, CLOCKS[i % len(CLOCKS)])
        params = gen.call()
        expected, got = run_case(replica, params)
        if wrong(expected, got):
            failures.append(describe(params, expected, got))
        counts["hit" if got[0] == "answer" else "pass"] += 1
        counts["rows"] += got[0] == "answer" and bool(got[1]["entities"])
        counts["error"] += expected[0] == "error"
    log.info("differential reads (seed %d): %s", SEED, counts)
    assert not failures, f"{len(failures)} wrong answers of {CASES} (seed {SEED}); first:\n" + "\n".join(failures[:5])
    # the fuzzer tests something: most of its reads are answered, many of them with rows
    assert counts["hit"] > CASES // 2 and counts["rows"] > CASES // 4, counts


def test_the_fuzzer_finds_a_wrong_rule(replica: Replica) -> None:
    """The fuzzer can fail: against a site that reads one rule otherwise (``is_not`` leaving out empty
    values, tests/test_audit.py's deviation), a few hundred reads find wrong answers."""
    gen = Gen(random.Random(SEED + 2), replica.pools)
    replica.site.deviations.add("is_not-drops-null")
    try:
        found = sum(wrong(*run_case(replica, gen.call())) for _ in range(400))
    finally:
        replica.site.deviations.discard("is_not-drops-null")
    assert found > 0


# ---------------------------------------------------------------------------------- regressions
def read_params(entity_type: str, filters: list[Any], fields: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A ``read`` of every matching row (one page of 500), filters in python form."""
    params: dict[str, Any] = {"type": entity_type, "return_fields": fields or ["id"],
                              "filters": _translate_filters(filters, "all"), "return_only": "active",
                              "paging": {"entities_per_page": 500, "current_page": 1}}
    params.update(extra)
    return params


HIT, PASS = "answer", "pass"
#: Mismatches the fuzzer found, each kept as a named read and what the engine must do with it: answer
#: (HIT, equal to the fake SG's answer) or pass (PASS). See the commit that fixed each.
REGRESSIONS: dict[str, tuple[dict[str, Any], str]] = {
    # the fake gave a row whose single-entity hop is empty a None candidate after it, so a negated
    # condition through a later multi_entity hop matched it: EXISTS, no linked entity, no match
    "single-hop-then-multi-hop-is_not": (read_params(
        "Shot", [["sg_sequence.Sequence.tasks.Task.entity", "is_not", L("Asset", 4)]]), HIT),
    "single-hop-then-multi-hop-is-None": (read_params(
        "Note", [["project.Project.users.HumanUser.updated_by", "is", None]]), HIT),
    "single-hop-then-multi-hop-not_in": (read_params(
        "Version", [["entity.Asset.parents.Asset.sg_status_list", "not_in", ["wtg", "act"]]]), HIT),
    # a checkbox at the end of a link may have no row (NULL): whether SG reads it as false (the fake)
    # or as no value (the engine) for "is False" / "is_not False" is not documented: the engine passes
    "deep-checkbox-is_not-False": (read_params(
        "Sequence", [["created_by.ApiUser.generate_event_log_entries", "is_not", False],
                     ["sg_status_list", "is", "ip"]]), PASS),
    "deep-checkbox-is-False": (read_params("Task", [["project.Project.archived", "is", False]]), PASS),
    "multi-then-single-hop-checkbox-is-False": (read_params(
        "Shot", [["assets.Asset.project.Project.archived", "is", False]]), PASS),
    # the fake SG crashed (ValueError) on a date of the right shape that does not exist; SG refuses it,
    # and the engine answered it (a date filter value was checked for its shape only)
    "impossible-date-is": (read_params("Shot", [["sg_due_date", "is", "2024-02-30"]]), PASS),
    "impossible-date-greater_than": (read_params("Shot", [["sg_due_date", "greater_than", "2023-13-01"]]), PASS),
    "impossible-date-deep-between": (read_params(
        "Task", [["entity.Shot.sg_due_date", "between", ["2024-01-01", "2024-02-31"]]]), PASS),
    "impossible-date_time": (read_params("Shot", [["sg_last_review", "less_than", "2024-02-10T25:00:00Z"]]), PASS),
    # "is True" and "is_not True" read the same either way
    "deep-checkbox-is-True": (read_params("Task", [["project.Project.archived", "is", True]]), HIT),
    "deep-checkbox-is_not-True": (read_params("Task", [["project.Project.archived", "is_not", True]]), HIT),
}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regression(replica: Replica, name: str) -> None:
    """Each read a fuzzing run once got wrong: the engine answers it as the fake SG does (HIT), or
    passes it (PASS)."""
    params, outcome = REGRESSIONS[name]
    expected, got = run_case(replica, params)
    assert not wrong(expected, got), describe(params, expected, got)
    assert got[0] == outcome, describe(params, expected, got)


def test_rows_of_a_retired_archived_project(db_url: str) -> None:
    """A retired Project that is archived: SG shows the rows' links to it as None, so the replica may not
    know which rows it held, and whether ``include_archived_projects: false`` leaves them out is not
    documented (the fake SG does, by the stored link): such reads pass while the replica holds one.
    Reading Projects themselves, and reads without the option, are still answered."""
    site = make_site(random.Random(SEED))
    assert site.find_direct("Project", [["id", "is", 4]], ["archived"])[0]["archived"]
    site.delete_direct("Project", 4)  # archived, and linked by some of the random rows
    built = build_replica(site, db_url)
    try:
        for entity_type in ("Shot", "Task", "Note", "Version", "Sequence", "Asset"):
            for return_only in ("active", "retired"):
                params = read_params(entity_type, [], ["project", "id"], include_archived_projects=False,
                                     return_only=return_only)
                expected, got = run_case(built, params)
                assert got == ("pass", "retired-archived-project"), describe(params, expected, got)
        for params in (read_params("Project", [], ["name"], include_archived_projects=False),
                       read_params("Shot", [], ["project"])):
            expected, got = run_case(built, params)
            assert got == expected and got[0] == "answer", describe(params, expected, got)
    finally:
        built.store.dispose()
