"""The audit (shadow reads) end to end: every hit also read from the fake SG and compared.

One rig on the oracle's data, two proxies auditing 100% of hits: the first only counts, the
second enforces. A sample of the oracle's corpus gives no disagreement; then the fake site reads
one rule otherwise (a test hook) and the disagreements are counted under that rule, kept in the
database without the client's key, shown on the status page, and (enforcing proxy) reads that rely
on the rule pass ``audit-disabled`` until the rule is cleared.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from cache.audit import table
from cache.audit.compare import agree
from cache.audit.rules import read_rules
from cache.replica.schema import Schema

from .fakesg import FakeSite
from .rig import KEY, SCRIPT, Rig
from .test_oracle import DEEP, ENTITIES, GROUPS, RETURNS, RULES, SCALARS, SORTS, populate
from .test_oracle import run as run_case
from .wait import wait_until

_URL_RE = re.compile(r"status page at (http://[\d.]+:\d+/)")
AUDIT = ["sgcache_max_lag=0", "sgcache_audit=100", "sgcache_audit_rate=0", "sgcache_status=127.0.0.1:0"]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, module_db_url: str) -> Iterator[Rig]:
    site = FakeSite.basic()
    site.add_script(SCRIPT, KEY)
    populate(site)
    with Rig(tmp_path_factory.mktemp("audit"), module_db_url, site, rules=RULES, proxy=AUDIT) as rig:
        rig.start_proxy([*AUDIT, "sgcache_audit_enforce=true"])
        yield rig


def status_url(rig: Rig, n: int) -> str:
    proxy = rig.proxies[n]
    return wait_until(lambda: (m := _URL_RE.search(proxy.output())) and m.group(1), 10, "the status page")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def total(rig: Rig, n: int, name: str, **labels: str) -> float:
    """The sum of a metric's samples on proxy ``n`` whose labels include ``labels``."""
    text = get(status_url(rig, n) + "metrics")
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def hit_cases() -> list[Any]:
    """Every third case of the oracle the cache answers itself."""
    cases = [p.values for p in SCALARS + ENTITIES + DEEP + GROUPS + RETURNS + SORTS if p.values[4]]
    return cases[::3]


def test_the_oracle_corpus_agrees(rig: Rig) -> None:
    sg = rig.client(rig.proxies[0])
    sg.find_one("Project", [])  # new credentials pass once; SG accepting them enables hits
    before_hits = total(rig, 0, "sgcache_hits_total")
    cases = hit_cases()
    for entity_type, filters, fields, kw, _hit in cases:
        run_case(sg, entity_type, filters, fields, dict(kw))
    hits = total(rig, 0, "sgcache_hits_total") - before_hits
    assert hits >= len(cases)
    wait_until(lambda: total(rig, 0, "sgcache_audit_reads_total") >= hits, 30, "every hit audited", pause=0.2)
    assert total(rig, 0, "sgcache_audit_reads_total", outcome="disagree") == 0
    assert total(rig, 0, "sgcache_audit_reads_total", outcome="error") == 0
    assert total(rig, 0, "sgcache_audit_disagreements_total") == 0
    assert total(rig, 0, "sgcache_audit_agreements_total", rule="text-match", entity_type="Shot") > 0
    assert total(rig, 0, "sgcache_audit_agreements_total", operator="is_not", rule="null-negation") > 0
    page = get(status_url(rig, 0))
    assert re.search(r"<th>agreements</th><td>[1-9]", page) and "<th>disagreements</th><td>0</td>" in page


def test_a_rule_sg_reads_otherwise_is_counted_kept_and_switched_off(rig: Rig) -> None:
    plain, enforcing = rig.client(rig.proxies[0]), rig.client(rig.proxies[1])
    enforcing.find_one("Project", [])
    query: list[Any] = [["description", "is_not", "no such text"]]
    other = [["sg_cut_in", "is_not", 5]]  # another read relying on null-negation
    unrelated = [["id", "greater_than", 0]]
    assert enforcing.find("Shot", other, ["code"]) == rig.direct().find("Shot", other, ["code"])
    rig.site.deviations.add("is_not-drops-null")
    try:
        with_nulls = plain.find("Shot", query, ["description"])  # the cache keeps empty descriptions
        assert with_nulls != rig.direct().find("Shot", query, ["description"]), "the data shows no difference"
        wait_until(lambda: total(rig, 0, "sgcache_audit_disagreements_total", rule="null-negation",
                                 operator="is_not", entity_type="Shot") >= 1, 20, "the disagreement counted", pause=0.2)
        assert total(rig, 0, "sgcache_audit_disagreements_total", rule="range") == 0
        page = get(status_url(rig, 0))
        assert re.search(r"<th>disagreements</th><td>[1-9]", page)
        assert "rules switched off</th><td>none" in page  # the first proxy does not enforce
        # the enforcing proxy: its disagreement switches the rules off for every read relying on them
        enforcing.find("Shot", query, ["description"])
        wait_until(lambda: _passes(rig, 1, "audit-disabled", lambda: enforcing.find("Shot", other, ["code"])),
                   20, "reads relying on null-negation pass", pause=0.2)
        hits = total(rig, 1, "sgcache_hits_total")
        enforcing.find("Shot", unrelated, ["code"])
        assert total(rig, 1, "sgcache_hits_total") == hits + 1  # a rule not switched off is served
    finally:
        rig.site.deviations.discard("is_not-drops-null")
    store = rig.store
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(table.audit)).mappings().all()
        off = table.disabled_rules(conn)
    assert rows and all(KEY not in str(dict(r)) for r in rows), "a disagreement kept the client's key"
    assert any("is_not null-negation" in r["rules"] and '"who": "pipeline"' in r["request"] for r in rows)
    assert "null-negation" in off and "range" not in off
    assert "null-negation" in get(status_url(rig, 1))
    listing = rig.run("audit", "--show", "1").stdout
    assert "rules switched off: " in listing and "null-negation" in listing and KEY not in listing
    rig.run("audit", "--clear")
    with store.engine.connect() as conn:
        assert table.disabled_rules(conn) == set()
    wait_until(lambda: not _passes(rig, 1, "audit-disabled", lambda: enforcing.find("Shot", other, ["code"])),
               20, "the rule served again", pause=0.2)


def _passes(rig: Rig, n: int, reason: str, read: Any) -> bool:
    """Whether ``read`` through proxy ``n`` passed with ``reason``."""
    before = total(rig, n, "sgcache_passes_total", reason=reason)
    read()
    return total(rig, n, "sgcache_passes_total", reason=reason) > before


# ---------------------------------------------------------------------------------- units
def test_unordered_answers_are_compared_as_sets() -> None:
    a = {"entities": [{"type": "Shot", "id": 2, "assets": [{"type": "Asset", "id": 2}, {"type": "Asset", "id": 1}]},
                      {"type": "Shot", "id": 1, "assets": []}], "paging_info": {"has_next_page": False}}
    b = {"entities": [{"type": "Shot", "id": 1, "assets": []},
                      {"type": "Shot", "id": 2, "assets": [{"type": "Asset", "id": 1}, {"type": "Asset", "id": 2}]}],
         "paging_info": {"has_next_page": False}}
    assert agree(a, b, {"sorts": []})
    assert not agree(a, b, {"sorts": [{"field_name": "code", "direction": "asc"}]})  # sorted: order counts
    assert not agree(a, {**b, "paging_info": {"has_next_page": True}}, {})


def test_rules_of_a_read(rig: Rig) -> None:
    schema = Schema.load(rig.schema_path)
    args = {"type": "Shot", "filters": {"logical_operator": "and", "conditions": [
        {"path": "code", "relation": "contains", "values": ["a"]},
        {"logical_operator": "or", "conditions": [
            {"path": "sg_sequence.Sequence.code", "relation": "is_not", "values": ["x"]},
            {"path": "sg_due_date", "relation": "in_last", "values": [1, "DAY"]}]}]},
        "sorts": [{"field_name": "id", "direction": "asc"}]}
    assert read_rules(schema, args) == {
        ("contains", "text-match"), ("is_not", "text-match"), ("is_not", "null-negation"),
        ("is_not", "deep-path"), ("in_last", "relative-date"), ("-", "sort")}
    assert read_rules(schema, {"type": "Shot", "filters": {"conditions": []}}) == {("-", "plain")}


def test_the_audit_table_keeps_the_newest(rig: Rig) -> None:
    with rig.store.write_engine.begin() as conn:
        for i in range(5):
            table.record(conn, "Shot", ["is plain"], {"params": i}, {}, {}, keep=3)
        kept = conn.execute(sa.select(table.audit.c.request).order_by(table.audit.c.id)).scalars().all()
    assert kept[-3:] == ['{"params": 2}', '{"params": 3}', '{"params": 4}'] and len(kept) == 3


class _Service:
    """A CacheService stand-in: a schema and a replica answer that can change."""

    def __init__(self, schema: Schema, results: dict[str, Any]) -> None:
        self.schema, self.results = schema, results

    def read(self, args: Any) -> dict[str, Any]:
        return self.results


def test_a_write_between_hit_and_shadow_is_not_a_disagreement(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry

    from cache.audit import shadow

    old = {"entities": [{"type": "Shot", "id": 1, "code": "a"}], "paging_info": {"has_next_page": False}}
    new = {"entities": [{"type": "Shot", "id": 1, "code": "b"}], "paging_info": {"has_next_page": False}}
    service = _Service(Schema.load(rig.schema_path), new)  # the replica has the write by the recheck
    monkeypatch.setattr(shadow.upstream, "post_json", lambda url, payload, tls: {"results": new})
    audit = shadow.Audit(lambda: service, CollectorRegistry(), sleep=lambda s: None)
    args = {"type": "Shot", "filters": {"logical_operator": "and", "conditions": []}}
    item = shadow.Shadow("http://sg/api3/json", "http://sg:80", {"script_name": "s", "script_key": KEY}, args,
                         json.dumps({"results": old}).encode(), None)
    audit.audit(item)
    assert audit.metrics.reads.labels(entity_type="Shot", outcome="changed")._value.get() == 1
    assert audit.metrics.reads.labels(entity_type="Shot", outcome="disagree")._value.get() == 0


def test_sampling_is_rate_limited_and_bounded() -> None:
    from prometheus_client import CollectorRegistry

    from cache.audit import shadow

    now = [0.0]
    audit = shadow.Audit(lambda: None, CollectorRegistry(), draw=lambda: 0.5, clock=lambda: now[0])
    audit.options = shadow.AuditOptions(percent=60, rate=2)  # no worker thread: the queue only fills
    args = {"type": "Shot", "filters": {"logical_operator": "and", "conditions": []}}
    now[0] = 10.0
    for _ in range(5):
        audit.offer("http://sg/api3/json", "http://sg:80", {}, args, b"{}", None)
    assert audit._queue.qsize() == 2  # the bucket holds 2 (rate 2/s)
    assert audit.metrics.dropped.labels(why="rate")._value.get() == 3
    audit.options = shadow.AuditOptions(percent=40, rate=0)
    audit.offer("http://sg/api3/json", "http://sg:80", {}, args, b"{}", None)  # drawn 50 >= 40: not sampled
    assert audit._queue.qsize() == 2
    relative = {**args, "filters": {"conditions": [{"path": "sg_due_date", "relation": "in_last", "values": [1, "DAY"]}]}}
    audit.offer("http://sg/api3/json", "http://sg:80", {}, relative, b"{}", None)  # relative dates: always, until 100 agreed
    assert audit._queue.qsize() == 3
    for _ in range(shadow.QUEUE_SIZE):
        audit.offer("http://sg/api3/json", "http://sg:80", {}, relative, b"{}", None)
    assert audit._queue.qsize() == shadow.QUEUE_SIZE and audit.metrics.dropped.labels(why="queue-full")._value.get() == 3
