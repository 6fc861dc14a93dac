"""cache/proxy/auth.py: which answers verify a credential, for which site, for how long (a fake clock)."""

from __future__ import annotations

from typing import Any

import pytest

from cache.proxy.auth import CredentialCache, site_of, verdict

SITE = site_of("https", "studio.shotgunstudio.com", 443)
OTHER = site_of("https", "studio.shotgunstudio.com", 8443)
SCRIPT = {"script_name": "pipeline", "script_key": "right-key"}
OK = {"results": {"entities": [], "paging_info": {"has_next_page": False}}}
AUTH_FAULT = {"exception": True, "error_code": 102, "message": "Can't authenticate script 'pipeline'"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def creds(clock: Clock) -> CredentialCache:
    return CredentialCache(ttl=300, clock=clock)


def test_a_successful_authenticated_answer_verifies_for_the_ttl(creds: CredentialCache, clock: Clock) -> None:
    assert creds.reason(SITE, SCRIPT) == "auth-unverified"
    assert creds.observe("read", SITE, SCRIPT, OK) is True
    assert creds.reason(SITE, SCRIPT) is None
    clock.now += 299
    assert creds.accepted(SITE, SCRIPT)
    clock.now += 1
    assert not creds.accepted(SITE, SCRIPT)
    assert creds.reason(SITE, SCRIPT) == "auth-unverified"


@pytest.mark.parametrize("method", ["read", "create", "update", "delete", "revive", "batch", "schema_read",
                                    "schema_entity_read", "get_session_token", "summarize"])
def test_every_method_but_info_verifies_when_sg_answers_it(creds: CredentialCache, method: str) -> None:
    assert creds.observe(method, SITE, SCRIPT, {"results": True}) is True
    assert creds.accepted(SITE, SCRIPT)


def test_info_never_verifies(creds: CredentialCache) -> None:
    made_up = {"script_name": "eve", "script_key": "guess"}
    assert creds.observe("info", SITE, made_up, {"version": [8, 0, 0]}) is None
    assert creds.observe("info", SITE, made_up, {"results": {"version": [8, 0, 0]}}) is None
    assert creds.reason(SITE, made_up) == "auth-unverified"


def test_info_does_not_revoke_either(creds: CredentialCache) -> None:
    creds.observe("read", SITE, SCRIPT, OK)
    creds.observe("info", SITE, SCRIPT, AUTH_FAULT)
    assert creds.accepted(SITE, SCRIPT)


@pytest.mark.parametrize(
    "reply",
    [
        {"exception": True, "error_code": 1, "message": "Unknown entity type"},
        {"exception": True, "error_code": 104, "message": "API read() CRUD ERROR #6"},
        {"exception": True, "message": "no code at all"},
        {"exception": True, "error_code": 1, "message": "batch failed", "results": [True]},
        {"exception": False, "error_code": 1, "message": "odd"},
        {"error_code": 1, "results": []},
        {"version": [8, 0, 0]},  # no results: not a success envelope
        {},
        None,  # not JSON, or not SG's content type
        [],
        "results",
        True,
    ],
)
def test_nothing_but_a_success_envelope_verifies(creds: CredentialCache, reply: Any) -> None:
    assert creds.observe("read", SITE, SCRIPT, reply) is None
    assert not creds.accepted(SITE, SCRIPT)
    assert creds.observe("batch", SITE, SCRIPT, reply) is None
    assert not creds.accepted(SITE, SCRIPT)


@pytest.mark.parametrize("code", [102, 106, 108, 110])
def test_an_authentication_fault_revokes(creds: CredentialCache, code: int) -> None:
    creds.observe("read", SITE, SCRIPT, OK)
    assert creds.observe("read", SITE, SCRIPT, {"exception": True, "error_code": code, "message": "no"}) is False
    assert not creds.accepted(SITE, SCRIPT)


def test_an_authentication_fault_revokes_the_credential_in_every_auth_dict(clock: Clock) -> None:
    """SG ignores auth keys it does not know: refusing the key with one set of them refuses it with all."""
    creds = CredentialCache(ttl=300, allow_users=True, clock=clock)
    tagged = {**SCRIPT, "x_tag": "1"}
    sudo = {**SCRIPT, "sudo_as_login": "ann"}  # the key for another user: another credential
    other = {"script_name": "other", "script_key": "other-key"}
    for auth in (SCRIPT, tagged, sudo, other):
        creds.observe("read", SITE, auth, OK)
        assert creds.accepted(SITE, auth)
    creds.observe("read", SITE, tagged, AUTH_FAULT)
    assert not creds.accepted(SITE, SCRIPT) and not creds.accepted(SITE, tagged)
    assert creds.accepted(SITE, sudo) and creds.accepted(SITE, other)


def test_other_errors_keep_a_verified_credential(creds: CredentialCache) -> None:
    creds.observe("read", SITE, SCRIPT, OK)
    creds.observe("read", SITE, SCRIPT, {"exception": True, "error_code": 1, "message": "bad filter"})
    assert creds.accepted(SITE, SCRIPT)


def test_bound_to_the_site(creds: CredentialCache) -> None:
    creds.observe("read", SITE, SCRIPT, OK)
    assert not creds.accepted(OTHER, SCRIPT)
    assert not creds.accepted(site_of("http", "studio.shotgunstudio.com", 443), SCRIPT)
    assert not creds.accepted(site_of("https", "other.shotgunstudio.com", 443), SCRIPT)
    assert creds.accepted(site_of("HTTPS", "Studio.ShotgunStudio.com", 443), SCRIPT)  # hosts are case-blind


@pytest.mark.parametrize(
    "variant",
    [
        {"script_name": "pipeline", "script_key": "wrong-key"},
        {"script_name": "pipeline", "script_key": "right-key "},
        {"script_name": "pipeline2", "script_key": "right-key"},
        {"script_name": "pipeline", "script_key": "right-key", "product": "rv"},
        {"script_name": "pipeline", "script_key": "right-key", "sudo_as_login": "bob"},
    ],
)
def test_bound_to_the_exact_credential(clock: Clock, variant: dict[str, Any]) -> None:
    creds = CredentialCache(ttl=300, clock=clock, allow_users=True)
    creds.observe("read", SITE, SCRIPT, OK)
    assert not creds.accepted(SITE, variant)


def test_session_uuid_is_not_part_of_the_credential(creds: CredentialCache) -> None:
    creds.observe("read", SITE, SCRIPT, OK)
    assert creds.accepted(SITE, {**SCRIPT, "session_uuid": "0f3c"})


def test_a_listed_script_with_a_wrong_key_stays_unverified(clock: Clock) -> None:
    creds = CredentialCache(ttl=300, clock=clock, scripts=["pipeline"])
    creds.observe("read", SITE, SCRIPT, OK)
    wrong = {"script_name": "pipeline", "script_key": "guess"}
    creds.observe("info", SITE, wrong, {"version": [8, 0, 0]})
    assert creds.reason(SITE, wrong) == "auth-unverified"
    creds.observe("read", SITE, wrong, AUTH_FAULT)
    assert creds.reason(SITE, wrong) == "auth-unverified"
    assert creds.reason(SITE, {"script_name": "other", "script_key": "x"}) == "script-not-listed"


def test_human_users_follow_the_same_rules(clock: Clock) -> None:
    login = {"user_login": "ann", "user_password": "pw"}
    session = {"session_token": "tok"}
    closed = CredentialCache(ttl=300, clock=clock)
    closed.observe("read", SITE, login, OK)
    assert closed.reason(SITE, login) == "user-auth" and closed.reason(SITE, session) == "user-auth"
    creds = CredentialCache(ttl=300, clock=clock, allow_users=True)
    for auth in (login, session):
        assert creds.reason(SITE, auth) == "auth-unverified"
        creds.observe("info", SITE, auth, {"version": [8]})
        assert creds.reason(SITE, auth) == "auth-unverified"
        creds.observe("read", SITE, auth, OK)
        assert creds.reason(SITE, auth) is None
        assert not creds.accepted(OTHER, auth)
    assert not creds.accepted(SITE, {"user_login": "ann", "user_password": "guess"})
    assert not creds.accepted(SITE, {"session_token": "tok2"})
    creds.observe("read", SITE, session, {"exception": True, "error_code": 102, "message": "expired"})
    assert not creds.accepted(SITE, session) and creds.accepted(SITE, login)
    clock.now += 301
    assert not creds.accepted(SITE, login)


def test_get_session_token_verifies_the_login_not_the_new_token(clock: Clock) -> None:
    creds = CredentialCache(ttl=300, clock=clock, allow_users=True)
    login = {"user_login": "ann", "user_password": "pw"}
    creds.observe("get_session_token", SITE, login, {"results": {"session_id": "tok"}})
    assert creds.accepted(SITE, login)
    assert not creds.accepted(SITE, {"session_token": "tok"})


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        (None, "no-auth"),
        ({}, "no-auth"),
        (["pipeline", "key"], "no-auth"),
        ("pipeline", "no-auth"),
        ({"script_name": ["pipeline"], "script_key": "k"}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": ["k"]}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": 12345}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": None}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": ""}, "bad-auth"),
        ({"script_name": {"a": 1}, "script_key": "k"}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": "k" * 5000}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": "k", "product": ["rv"]}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": "k", "product": "x" * 5000}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": "k", "n": float("nan")}, "bad-auth"),  # hashed as null
        ({"script_name": "pipeline", "script_key": "k", "n": float("inf")}, "bad-auth"),
        ({"script_name": "pipeline", "script_key": "k", **{f"x{i}": i for i in range(20)}}, "bad-auth"),
        ({"script_name": "pipeline"}, "unknown-auth"),
        ({"script_key": "k"}, "unknown-auth"),
        ({"product": "rv"}, "unknown-auth"),
        ({"script_name": "pipeline", "script_key": "k", "session_token": "t"}, "mixed-auth"),
        ({"script_name": "pipeline", "script_key": "k", "user_password": "p"}, "mixed-auth"),
        ({"script_name": "pipeline", "script_key": "k", "sudo_as_login": "bob"}, "sudo"),
    ],
)
def test_odd_auth_shapes_pass_with_a_reason_and_never_verify(clock: Clock, auth: Any, reason: str) -> None:
    for scripts in (None, ["pipeline"]):
        creds = CredentialCache(ttl=300, clock=clock, scripts=scripts)
        assert creds.reason(SITE, auth) == reason
        creds.observe("read", SITE, auth, OK)  # never raises, never verifies an odd shape
        assert creds.reason(SITE, auth) == reason


def test_verdict_table() -> None:
    assert verdict("read", OK) is True
    assert verdict("info", OK) is None
    assert verdict("read", AUTH_FAULT) is False
    assert verdict(None, OK) is None
    assert verdict(["read"], OK) is None


@pytest.mark.parametrize("method", ["INFO", "info ", "Info", "no_such_method", "read\x00", ""])
def test_a_method_sg_may_not_authenticate_never_verifies(method: str) -> None:
    # SG's routing of a name shotgun_api3 never sends is not known: it may be info's, unauthenticated
    assert verdict(method, OK) is None
    assert verdict(method, AUTH_FAULT) is False  # a refusal of the credential still counts


@pytest.mark.parametrize("method", ["read", "create", "batch", "schema_read", "summarize", "get_session_token"])
def test_the_methods_shotgun_api3_sends_verify(method: str) -> None:
    assert verdict(method, OK) is True


def test_only_hashes_are_kept(creds: CredentialCache) -> None:
    creds.observe("read", SITE, SCRIPT, OK)
    assert all(isinstance(k, bytes) and b"right-key" not in k for k in creds._accepted)
    assert "right-key" not in repr(vars(creds))
