"""The API3 wire format: decoding request bodies and encoding SG's envelopes."""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cache import fastjson

#: Largest body the proxy will parse; bigger ones pass through untouched.
MAX_BODY = 32 * 1024 * 1024
#: SG answers no larger than this are decoded to tell its error envelope from a success; a larger
#: one is taken for a success (it may report a write).
SMALL_ANSWER = 4 * 1024 * 1024
#: SG's error code for a failed authentication (the client raises AuthenticationFault).
AUTH_ERROR_CODE = 102
#: The object keys whose values decide which call SG makes and for whom: the envelope's and the
#: auth dict's credential keys (cache/proxy/auth.py).
DECIDING_KEYS = frozenset({"method_name", "params", "script_name", "script_key", "user_login", "user_password",
                           "auth_token", "session_token", "sudo_as_login"})
#: The same, quoted, as a body spells them without escapes.
_QUOTED_DECIDING_KEYS = tuple(f'"{name}"'.encode() for name in sorted(DECIDING_KEYS))


@dataclass(frozen=True)
class Api3Request:
    """A decoded ``{"method_name": ..., "params": [auth, args]}`` body."""

    method: str
    auth: Mapping[str, Any] | None
    args: Any


def decode_request(body: bytes) -> Api3Request | None:
    """Decode an API3 body, or None when it is not one (it then passes through unchanged)."""
    if not body or len(body) > MAX_BODY:
        return None
    try:
        # UTF-8 only (shotgun_api3 sends UTF-8; json.loads would also guess UTF-16/32)
        data = fastjson.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("method_name"), str):
        return None
    params = data.get("params", [])
    if not isinstance(params, list):
        return None
    auth = params[0] if params and isinstance(params[0], dict) else None
    args = params[1] if len(params) > 1 else None
    return Api3Request(data["method_name"], auth, args)


class _RepeatedKey(ValueError):
    pass


def _no_repeat(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _RepeatedKey
    return obj


def _no_repeated_deciding_key(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        names = [key for key, _value in pairs if key in DECIDING_KEYS]
        if len(names) != len(set(names)):
            raise _RepeatedKey
    return obj


def repeats_a_key(body: bytes, every_key: bool = False) -> bool:
    """Whether the decoded API3 ``body`` repeats a key in one of its objects: one of
    :data:`DECIDING_KEYS` (anywhere), or with ``every_key`` (a write, whose arguments the replica
    learns) any key. JSON parsers differ on which value of a repeated key counts (the proxy's takes
    the last, another may take the first), so SG may make another call, or for another credential,
    than the proxy sees: such a body is not decoded. Cheap on the hit path: the body is parsed again
    only when it may repeat one (a deciding key's name spelled twice, or an escape, ``\\u``, that
    could spell one), or with ``every_key``."""
    if not every_key and b"\\u" not in body and all(body.count(name) < 2 for name in _QUOTED_DECIDING_KEYS):
        return False
    try:
        json.loads(body.decode("utf-8"), object_pairs_hook=_no_repeat if every_key else _no_repeated_deciding_key)
    except (ValueError, RecursionError):  # _RepeatedKey; anything else was decoded before: not again
        return True
    return False


def _first_value(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose repeated keys keep their first value (as some JSON parsers read it)."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


def encode_results(results: Any) -> bytes:
    """SG's success envelope (NaN and infinities refused upstream, cache/fastjson.py)."""
    return fastjson.dumps({"results": results})


def encode_error(message: str, code: int = 1) -> bytes:
    """SG's error envelope (sent with HTTP 200: the client checks the envelope, not the status)."""
    return json.dumps({"exception": True, "error_code": code, "message": message}).encode("utf-8")


def decode_response(body: bytes) -> Any:
    """The JSON of an upstream answer, or None when it is not JSON."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def is_error(reply: Any) -> bool:
    return isinstance(reply, dict) and bool(reply.get("exception"))


def changed_nothing(status: int, body: bytes) -> bool:
    """SG's answer shows the call changed nothing: an HTTP 4xx, or a 200 carrying its error envelope
    (decoded only up to ``SMALL_ANSWER``). A 5xx, another status, or a body that is not JSON may
    report a call SG applied."""
    if 400 <= status < 500:
        return True
    return status == 200 and len(body) <= SMALL_ANSWER and is_error(decode_response(body))


def succeeded(status: int, body: bytes) -> bool:
    """SG's answer may report a call it applied: a 200 carrying its success envelope (a JSON object
    with ``results``), or one too large to decode (``SMALL_ANSWER``)."""
    if status != 200:
        return False
    if len(body) > SMALL_ANSWER:
        return True
    reply = decode_response(body)
    return isinstance(reply, dict) and "results" in reply


#: zlib's window bits for each request Content-Encoding a lenient server might inflate.
_INFLATE = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def lenient_methods(body: bytes, content_encoding: str) -> set[str | None]:
    """The ``method_name`` of each way a lenient server could read a body the proxy did not decode
    and answer it with success (:func:`lenient_calls`); None stands for what may be anything."""
    return {method for method, _params in lenient_calls(body, content_encoding)}


def lenient_calls(body: bytes, content_encoding: str) -> list[tuple[str | None, Any]]:
    """``(method_name, params)`` of each way a lenient server could read a body the proxy did not
    decode and answer it with success: as sent, and inflated per ``content_encoding`` (gzip,
    deflate; at most ``MAX_BODY``), as JSON in any UTF (a BOM too; NaN allowed; invalid UTF-8
    replaced), a repeated key taking its last value or its first. A reading that fails (not JSON, not valid gzip) is left out: SG's success was not
    that one. A method None stands for what may be anything: a reading without a ``method_name``,
    or no reading found (an encoding not inflated here, brotli say, whose body is not JSON as sent
    either; a body over ``MAX_BODY``)."""
    if len(body) > MAX_BODY:
        return [(None, None)]
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() not in ("", "identity")]
    readings, calls = [body], list[tuple[str | None, Any]]()
    try:
        inflated: bytes | None = body
        for coding in reversed(codings):
            inflated = None if inflated is None else _inflate(inflated, coding)
        if inflated is not None and codings:
            readings.append(inflated)
    except ValueError:  # not what it says it is: a server inflating it would have failed
        pass
    for data in readings:
        for text in (data, data.decode("utf-8", "replace")):
            try:
                decodings = [json.loads(text), json.loads(text, object_pairs_hook=_first_value)]
            except (ValueError, RecursionError):
                continue
            for decoded in decodings:
                method = decoded.get("method_name") if isinstance(decoded, dict) else None
                params = decoded.get("params") if isinstance(decoded, dict) else None
                calls.append((method if isinstance(method, str) else None, params))
            break
    return calls or [(None, None)]


def _inflate(body: bytes, coding: str) -> bytes | None:
    """``body`` inflated from ``coding``; None when that is not done here (an unknown coding, over
    ``MAX_BODY``). Raises ValueError when it is not valid ``coding``."""
    wbits = _INFLATE.get(coding)
    if wbits is None:
        return None
    for bits in (wbits, -15) if coding == "deflate" else (wbits,):  # deflate: zlib's, or raw
        inflater = zlib.decompressobj(bits)
        try:
            data = inflater.decompress(body, MAX_BODY + 1)
        except zlib.error:
            continue
        return data if len(data) <= MAX_BODY and not inflater.unconsumed_tail else None
    raise ValueError(f"not {coding}")
