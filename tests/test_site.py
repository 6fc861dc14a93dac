"""cache/replica/site.py: site identity, and the binding of a replica to one site (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from cache.replica import site as sitemod
from cache.replica.schema import Schema
from cache.replica.site import Site, SiteError, SiteMismatch
from cache.replica.store import Store

from .paths import BASIC_SCHEMA


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("https://Studio.ShotgunStudio.com", "https://studio.shotgunstudio.com:443"),
        ("https://studio.shotgunstudio.com/", "https://studio.shotgunstudio.com:443"),
        ("https://studio.shotgunstudio.com:443/api3", "https://studio.shotgunstudio.com:443"),
        ("HTTP://sg.studio.internal", "http://sg.studio.internal:80"),
        ("http://sg.studio.internal:8080", "http://sg.studio.internal:8080"),
        ("https://sg.studio.internal.:8443", "https://sg.studio.internal:8443"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        ("  https://a.b  ", "https://a.b:443"),
    ],
)
def test_parse_normalises(url: str, normal: str) -> None:
    assert sitemod.normalise(url) == normal
    assert sitemod.normalise(normal) == normal  # stable


@pytest.mark.parametrize(
    "url",
    ["", "studio.shotgunstudio.com", "ftp://studio.shotgunstudio.com", "https://", "https://user:pw@host",
     "https://host?x=1", "https://host#frag", "https://host:notaport", "https://host:0", "https://host:70000"],
)
def test_bad_site_urls_are_refused(url: str) -> None:
    with pytest.raises(SiteError):
        Site.parse(url)


def test_matches_compares_scheme_host_port_and_host_header() -> None:
    site = Site.parse("https://studio.shotgunstudio.com")
    assert site.matches("https", "STUDIO.shotgunstudio.com", 443)
    assert site.matches("https", "studio.shotgunstudio.com", 443, "studio.shotgunstudio.com")
    assert site.matches("https", "studio.shotgunstudio.com", 443, "Studio.ShotgunStudio.com:443")
    assert not site.matches("http", "studio.shotgunstudio.com", 443)
    assert not site.matches("https", "studio.shotgunstudio.com", 8443)
    assert not site.matches("https", "other.shotgunstudio.com", 443)
    # the site's address, another tenant's name: SG would route it to that tenant
    assert not site.matches("https", "studio.shotgunstudio.com", 443, "other.shotgunstudio.com")
    assert not site.matches("https", "studio.shotgunstudio.com", 443, "studio.shotgunstudio.com:8443")
    v6 = Site.parse("http://[::1]:8000")
    assert v6.matches("http", "::1", 8000, "[::1]:8000") and not v6.matches("http", "::1", 8000, "[::2]:8000")


@pytest.fixture
def store(db_url: str):  # type: ignore[no-untyped-def]
    s = Store.open(db_url, Schema.load(BASIC_SCHEMA))
    yield s
    s.dispose()


def test_bind_stores_once_and_refuses_another_site(store: Store) -> None:
    ours, theirs = Site.parse("https://a.shotgunstudio.com"), Site.parse("https://b.shotgunstudio.com")
    assert sitemod.stored_site(store) is None
    assert sitemod.check(store, ours) is None  # unbound: nothing to compare, nothing stored
    assert sitemod.stored_site(store) is None
    sitemod.bind(store, ours)
    sitemod.bind(store, Site.parse("https://A.shotgunstudio.com:443/"))  # the same site, spelt otherwise
    assert sitemod.stored_site(store) == "https://a.shotgunstudio.com:443"
    with pytest.raises(SiteMismatch) as exc:
        sitemod.bind(store, theirs)
    assert "https://a.shotgunstudio.com:443" in str(exc.value) and "https://b.shotgunstudio.com:443" in str(exc.value)
    with pytest.raises(SiteMismatch):
        sitemod.check(store, theirs)
    assert sitemod.stored_site(store) == "https://a.shotgunstudio.com:443"  # unchanged by the refusals


def test_resolve_takes_the_stored_site_when_none_is_configured(store: Store) -> None:
    assert sitemod.resolve(store, None) is None
    sitemod.resolve(store, Site.parse("http://sg.studio.internal"))  # binds an unbound replica
    assert sitemod.resolve(store, None) == Site.parse("http://sg.studio.internal:80")
    with pytest.raises(SiteMismatch):
        sitemod.resolve(store, Site.parse("https://sg.studio.internal"), bind_unbound=False)


def test_stored_site_of_a_database_without_tables(db_url: str) -> None:
    bare = Store.open(db_url, Schema.load(BASIC_SCHEMA), create=False)
    try:
        assert sitemod.stored_site(bare) is None
        assert sitemod.check(bare, Site.parse("https://a.b")) is None
    finally:
        bare.dispose()


def test_bind_never_overwrites_a_site_stored_meanwhile(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A program that read 'unbound' and then inserts loses to the one that bound first."""
    ours, theirs = Site.parse("https://a.shotgunstudio.com"), Site.parse("https://b.shotgunstudio.com")
    real = sitemod.stored_site
    calls = {"n": 0}

    def first_sees_nothing(st: Store, conn=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            with st.write_engine.begin() as c:
                st.set_state(c, sitemod.SITE_KEY, theirs.url)  # the other program binds now
            return None
        return real(st, conn)

    monkeypatch.setattr(sitemod, "stored_site", first_sees_nothing)
    with pytest.raises(SiteMismatch):
        sitemod.bind(store, ours)
    monkeypatch.undo()
    assert sitemod.stored_site(store) == theirs.url
