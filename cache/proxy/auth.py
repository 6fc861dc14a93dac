"""Which credentials may be served from the cache: only those SG itself accepted, at that site.

The policy, in one place (the addon only reports what it saw):

- SG authenticates every API3 method but ``info``. A credential becomes *verified* only by
  SG's **successful** answer (HTTP 200, JSON, ``{"results": ...}`` with no error envelope) to
  a method SG authenticates, sent with exactly that auth dict to that site. Nothing else
  verifies: not ``info``, not any error envelope (whatever its code, also for ``batch``), not
  an answer the proxy made itself, not a body that is not API3.
- An authentication error (``error_code`` 102, or the other login faults 106, 108, 110)
  forgets the credential at once, in every auth dict it was verified in (they differ only in
  keys SG ignores); other errors change nothing.
- A verified credential is bound to the site (scheme, host, port) and to the whole auth dict
  (script name and key, or login and password, or session token, plus ``sudo_as_login`` and
  any extra auth parameters); only ``session_uuid``, which merely tags events, is ignored.
- It stays verified for ``ttl`` seconds after SG's last success. Credentials are kept only
  as a salted hash, in memory: at most ``max_entries``, and at most :data:`MAX_VARIANTS` auth
  dicts that differ only in keys other than the credential's own (one client's made-up keys
  displace only its own entries).
- Auth dicts of unexpected shapes (non-string credentials, nested values, huge values,
  several login forms at once) are never served: they pass with a reason, and SG answers.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cache import fastjson

#: API3 methods SG answers without authenticating the caller.
UNAUTHENTICATED_METHODS = frozenset({"info"})
#: The API3 methods shotgun_api3 calls that SG answers only for credentials it accepts: a success
#: to one of these verifies the credential. Any other name (``INFO``, ``info ``, a method SG may
#: add) is not known to be authenticated by SG, so its success proves nothing.
AUTHENTICATED_METHODS = frozenset({
    "activity_stream", "batch", "create", "delete", "export_page", "follow", "followers", "following",
    "get_session_token", "note_thread_contents", "preferences_read", "query_display_name_cache", "read",
    "revive", "schema_entity_read", "schema_field_create", "schema_field_delete", "schema_field_read",
    "schema_field_update", "schema_read", "summarize", "unfollow", "update",
    "update_project_last_accessed_by_current_user", "user_subscriptions_create", "user_subscriptions_read",
    "work_schedule_read", "work_schedule_update",
})
#: SG's error codes for refused credentials (AuthenticationFault, 2FA, SSO, Oxygen).
AUTH_ERROR_CODES = frozenset({102, 106, 108, 110})
#: Auth keys whose answers SG may filter by the user's permission rules.
_USER_KEYS = ("user_login", "session_token", "auth_token")
#: Auth keys whose values must be strings.
_STRING_KEYS = frozenset({
    "script_name", "script_key", "user_login", "user_password", "auth_token", "session_token",
    "sudo_as_login", "session_uuid",
})
#: Longest auth value (characters) and most keys the cache considers; bigger ones pass.
MAX_VALUE_CHARS = 1024
MAX_KEYS = 16
#: Credentials remembered at most (``sgcache_auth_cache``): past it the expired ones are swept,
#: then those closest to expiry forgotten (their next read passes once, and SG accepts them again).
MAX_CREDENTIALS = 10_000
#: The auth keys shotgun_api3 sends that name a credential (``session_uuid`` only tags events).
CREDENTIAL_KEYS = frozenset({"script_name", "script_key", "user_login", "user_password", "auth_token",
                             "session_token", "sudo_as_login"})
#: Auth dicts remembered at most for one credential that differ only in other keys (a client library
#: may add one of its own): past it that credential's least recently verified one is forgotten, so
#: one client sending endless made-up keys never pushes other clients' credentials out.
MAX_VARIANTS = 4


def site_of(scheme: str, host: str, port: int) -> str:
    """The site a request went to, as a credential is bound to it: ``scheme://host:port``."""
    return f"{scheme.lower()}://{host.lower().rstrip('.')}:{int(port)}"


def verdict(method: Any, reply: Any) -> bool | None:
    """What SG's decoded ``reply`` to ``method`` says of the credentials it was sent with:
    True (accepted: a success to a method of :data:`AUTHENTICATED_METHODS`), False (refused, to
    any method) or None (nothing)."""
    if not isinstance(method, str) or method in UNAUTHENTICATED_METHODS:
        return None
    if not isinstance(reply, Mapping):
        return None
    if reply.get("exception") or "error_code" in reply:
        refused = reply.get("exception") and reply.get("error_code") in AUTH_ERROR_CODES
        return False if refused else None
    if "results" not in reply or method not in AUTHENTICATED_METHODS:
        return None
    return True


def _odd_text(text: str) -> bool:
    """Too long, or not text at all: a lone surrogate (JSON's ``"\\ud800"``), which no UTF-8 spells."""
    if len(text) > MAX_VALUE_CHARS:
        return True
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _odd_value(key: str, value: Any) -> bool:
    if key in _STRING_KEYS:
        return not isinstance(value, str) or not value or _odd_text(value)
    if isinstance(value, str):
        return _odd_text(value)
    if isinstance(value, float):
        return not math.isfinite(value)  # (never decoded from JSON; one would hash as null)
    return not (value is None or isinstance(value, bool | int))


class CredentialCache:
    """Remembers, per site and credential hash, that SG accepted it, for a while."""

    def __init__(
        self,
        ttl: float = 300.0,
        allow_users: bool = False,
        clock: Callable[[], float] = time.monotonic,
        scripts: Iterable[str] | None = None,
        max_entries: int = MAX_CREDENTIALS,
    ):
        """``scripts``: when given, only these script names are served from the cache (SG may
        restrict a script by a permission rule set; list the ones that may read everything).
        ``max_entries``: credentials remembered at most."""
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self.allow_users = allow_users
        self.scripts = None if scripts is None else frozenset(scripts)
        self._clock = clock
        self._salt = os.urandom(16)
        self._accepted: dict[bytes, float] = {}
        #: credential hash -> the keys of :attr:`_accepted` of its auth dicts, least recently verified first
        self._variants: dict[bytes, dict[bytes, None]] = {}
        self._lock = threading.Lock()

    def key(self, site: str, auth: Mapping[str, Any]) -> bytes:
        """A salted hash of the site and the credential part of an auth dict (session_uuid is ignored).
        Its values are finite (see :func:`_odd_value`): their JSON tells every credential apart."""
        creds = {k: v for k, v in auth.items() if k != "session_uuid"}
        return hashlib.sha256(self._salt + fastjson.dumps([site, creds], sort_keys=True)).digest()

    def _credential(self, site: str, auth: Mapping[str, Any]) -> bytes:
        """A salted hash of the site and the auth dict's :data:`CREDENTIAL_KEYS` alone."""
        creds = {k: v for k, v in auth.items() if k in CREDENTIAL_KEYS}
        return hashlib.sha256(self._salt + b"credential" + fastjson.dumps([site, creds], sort_keys=True)).digest()

    def kind_reason(self, auth: Any) -> str | None:
        """Why this credential is never served from the cache, or None when it may be (once verified)."""
        if not isinstance(auth, Mapping) or not auth:
            return "no-auth"
        if len(auth) > MAX_KEYS or any(not isinstance(k, str) or _odd_text(k) or _odd_value(k, v) for k, v in auth.items()):
            return "bad-auth"
        forms = [("user_login" in auth or "user_password" in auth),
                 ("script_name" in auth or "script_key" in auth), "session_token" in auth]
        if sum(forms) > 1:
            return "mixed-auth"  # which one SG would use is SG's business: pass
        if "sudo_as_login" in auth and not self.allow_users:
            return "sudo"
        if any(k in auth for k in _USER_KEYS):
            if not self.allow_users:
                return "user-auth"
            if "user_login" in auth and "user_password" not in auth:
                return "unknown-auth"
            return None
        if "script_name" in auth and "script_key" in auth:
            if self.scripts is not None and auth["script_name"] not in self.scripts:
                return "script-not-listed"
            return None
        return "unknown-auth"

    def reason(self, site: str, auth: Any) -> str | None:
        """Why a read with ``auth`` at ``site`` may not be served from the cache now, or None."""
        reason = self.kind_reason(auth)
        if reason is None and not self._accepted_now(site, auth):
            reason = "auth-unverified"
        return reason

    def accepted(self, site: str, auth: Any) -> bool:
        """Whether SG accepted exactly this credential at exactly this site less than ``ttl`` ago."""
        return self.kind_reason(auth) is None and self._accepted_now(site, auth)

    def _accepted_now(self, site: str, auth: Mapping[str, Any]) -> bool:
        key = self.key(site, auth)
        with self._lock:
            until = self._accepted.get(key)
            if until is None:
                return False
            if until <= self._clock():
                self._forget(key, self._credential(site, auth))
                return False
            return True

    def observe(self, method: Any, site: str, auth: Any, reply: Any) -> bool | None:
        """Learn from SG's decoded ``reply`` to a ``method`` call made with ``auth`` at ``site``.

        Call it only with answers that came from SG. Returns the verdict applied (see :func:`verdict`).
        """
        if self.kind_reason(auth) is not None:
            return None
        ok = verdict(method, reply)
        if ok is not None:
            self._record(site, auth, ok)
        return ok

    def _record(self, site: str, auth: Mapping[str, Any], ok: bool) -> None:
        key, credential = self.key(site, auth), self._credential(site, auth)
        with self._lock:
            if not ok:  # SG refused the credential: in every auth dict (it ignores the other keys)
                for variant in list(self._variants.get(credential, ())):
                    self._forget(variant, credential)
                self._forget(key, credential)
                return
            self._accepted[key] = self._clock() + self.ttl
            variants = self._variants.setdefault(credential, {})
            variants.pop(key, None)
            variants[key] = None  # the most recently verified last
            while len(variants) > MAX_VARIANTS:
                self._accepted.pop(next(iter(variants)), None)
                del variants[next(iter(variants))]
            if len(self._accepted) > self.max_entries:
                now = self._clock()
                kept = {k: v for k, v in self._accepted.items() if v > now}
                if len(kept) > self.max_entries:  # all still valid: keep the longest-lived
                    kept = dict(sorted(kept.items(), key=lambda item: item[1])[-self.max_entries:])
                self._accepted = kept
                self._variants = {c: live for c, v in self._variants.items()
                                  if (live := {k: None for k in v if k in kept})}

    def _forget(self, key: bytes, credential: bytes) -> None:
        """Forget one auth dict (the lock held)."""
        self._accepted.pop(key, None)
        variants = self._variants.get(credential)
        if variants is not None:
            variants.pop(key, None)
            if not variants:
                del self._variants[credential]
