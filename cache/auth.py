"""Which credentials may be served from the cache: only those SG itself accepted.

Credentials are kept only as a salted hash, in memory, for ``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: Auth keys whose answers SG may filter by the user's permission rules.
_USER_KEYS = ("user_login", "session_token", "auth_token")


class CredentialCache:
    """Remembers, per credential hash, that SG accepted or rejected it, for a while."""

    def __init__(
        self,
        ttl: float = 300.0,
        allow_users: bool = False,
        clock: Callable[[], float] = time.monotonic,
        scripts: Iterable[str] | None = None,
    ):
        """``scripts``: when given, only these script names are served from the cache (SG may
        restrict a script by a permission rule set; list the ones that may read everything)."""
        self.ttl = ttl
        self.allow_users = allow_users
        self.scripts = None if scripts is None else frozenset(scripts)
        self._clock = clock
        self._salt = os.urandom(16)
        self._accepted: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def key(self, auth: Mapping[str, Any]) -> bytes:
        """A salted hash of the credential part of an auth dict (session_uuid is ignored)."""
        creds = {k: v for k, v in auth.items() if k != "session_uuid"}
        blob = json.dumps(creds, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(self._salt + blob).digest()

    def kind_reason(self, auth: Mapping[str, Any] | None) -> str | None:
        """Why this kind of credential is never served from the cache, or None."""
        if not auth:
            return "no-auth"
        if "sudo_as_login" in auth and not self.allow_users:
            return "sudo"
        if any(k in auth for k in _USER_KEYS):
            return None if self.allow_users else "user-auth"
        if "script_name" in auth and "script_key" in auth:
            if self.scripts is not None and auth["script_name"] not in self.scripts:
                return "script-not-listed"
            return None
        return "unknown-auth"

    def accepted(self, auth: Mapping[str, Any]) -> bool:
        key = self.key(auth)
        with self._lock:
            until = self._accepted.get(key)
            if until is None:
                return False
            if until < self._clock():
                del self._accepted[key]
                return False
            return True

    def record(self, auth: Mapping[str, Any], ok: bool) -> None:
        """Record SG's verdict on these credentials."""
        key = self.key(auth)
        with self._lock:
            if ok:
                self._accepted[key] = self._clock() + self.ttl
            else:
                self._accepted.pop(key, None)
            if len(self._accepted) > 10_000:
                now = self._clock()
                self._accepted = {k: v for k, v in self._accepted.items() if v >= now}
