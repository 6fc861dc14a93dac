"""Which REST API calls may change the site (cache/proxy/rest.py), and a write that may have changed any
row while no replica was open (the next to open marks every type first)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache.errors import Passthrough
from cache.proxy.replica import Replica, ReplicaOptions
from cache.proxy.rest import changed, is_rest_write, schema_field
from cache.replica.schema import Schema
from cache.replica.store import Store

from .fakesg import FakeSite
from .paths import BASIC_SCHEMA
from .replica import SiteClient, prime
from .rig import populate


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/api/v1/entity/shots/12"),
    ("PATCH", "/api/v1/entity/Shot/12"),
    ("DELETE", "/api/v1/entity/shots/12"),
    ("POST", "/api/v1/entity/shots"),
    ("POST", "/api/v1/entity/shots/12?revive=true"),
    ("POST", "/api/v1/entity/_batch"),
    ("POST", "/api/v1.1/entity/shots/12/relationships/assets"),
    ("DELETE", "/api/v1/entity/shots/12/followers"),
    ("PUT", "/api/v1/schema/shots/fields/code"),
    ("POST", "/sg/api/v2/entity/shots"),  # a site under a path prefix, a later version
    ("POST", "//API/V1//entity/shots/"),  # letter case, doubled slashes
    ("PUT", "/api/v1/entity/shots/_search"),  # only a POST to it is a search
    ("POST", "/api/v1/entity/shots/12/_search_not"),
])
def test_rest_calls_that_may_change_the_site(method: str, path: str) -> None:
    assert is_rest_write(method, path)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/entity/shots/12"),
    ("HEAD", "/api/v1/entity/shots"),
    ("OPTIONS", "/api/v1/entity/shots"),
    ("POST", "/api/v1/entity/shots/_search"),
    ("POST", "/api/v1/entity/_text_search"),
    ("POST", "/api/v1/entity/shots/_summarize?x=1"),
    ("POST", "/api/v1/hierarchy/_expand"),
    ("POST", "/api/v1/auth/access_token"),
    ("POST", "/api3/json"),  # API3: the addon's own business
    ("POST", "/upload/upload_file"),  # uploads: cache/proxy/uploads.py
    ("POST", "/apiv1/entity/shots"),
    ("PUT", "/page/api/entity"),
])
def test_rest_reads_and_other_paths(method: str, path: str) -> None:
    assert not is_rest_write(method, path)


def test_a_refusal_changed_nothing_anything_else_may_have() -> None:
    assert [changed(s) for s in (200, 201, 204, 302, 400, 401, 404, 422, 499, 500, 503)] == [
        True, True, True, True, False, False, False, False, False, True, True]


def test_the_field_a_schema_edit_names() -> None:
    assert schema_field("DELETE", "/api/v1/schema/Shot/fields/sg_cut_in") == ("Shot", "sg_cut_in")
    assert schema_field("PUT", "/sg/api/v1/Schema/shots/Fields/sg_Status%5Flist?x=1") == ("shots", "sg_Status_list")
    assert schema_field("POST", "/api/v1/schema/shots/fields") is None  # a new field: nothing cached
    assert schema_field("PUT", "/api/v1/entity/shots/12") is None
    assert schema_field("DELETE", "/other/schema/Shot/fields/code") is None  # not the REST API


def test_every_type_is_marked_by_the_replica_that_opens_after_such_a_write(tmp_path: Path, db_url: str) -> None:
    """An upload or REST write SG answered while no replica was open: the replica that opens next
    marks every cached type before its first read (before, nothing was kept: its reads hit)."""
    site = FakeSite()
    populate(site)
    store = Store.open(db_url, Schema.load(BASIC_SCHEMA), create=True)
    prime(store, SiteClient(site))
    store.dispose()
    replica = Replica(ReplicaOptions(db_url, str(BASIC_SCHEMA), 0, 0))
    replica.defer_every_type()  # nothing open yet
    service = replica.open()
    assert service is not None
    read = {"type": "Shot", "return_fields": ["code"], "return_only": "active",
            "filters": {"logical_operator": "and", "conditions": []},
            "paging": {"entities_per_page": 10, "current_page": 1}}
    try:
        with pytest.raises(Passthrough) as passed:
            service.read(read)
        assert passed.value.reason == "pending-write"
        with service.store.write_engine.begin() as conn:
            conn.execute(service.store.pending.delete())  # the ingester is past it
        assert [r["code"] for r in service.read(read)["entities"]][:1] == ["sh000"]
    finally:
        replica.close()
