"""JSON straight to and from bytes: orjson when installed (about ten times faster on the
hit path's answers), else the standard library, with the same results.

Both encoders write compact UTF-8 (``separators=(",", ":")``, no ASCII escaping); a float may
be spelled differently (``1e16`` for ``1e+16``), never with another value. Whatever orjson
refuses (integers beyond 64 bits, datetimes, non-string keys) goes to the standard library, so
the accepted inputs and their errors stay the standard library's. One difference stays:
orjson writes NaN and the infinities as ``null``; callers give :func:`dumps` only values that
hold none (the replica's decoders refuse them, cache/replica/fieldtypes.py).
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # optional: the standard library gives the same bytes, slower
    orjson = None  # type: ignore[assignment]

if orjson is not None:
    # datetimes, dataclasses and str/int/dict subclasses go to the standard library's rules
    _OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS
    _SORTED = _OPTIONS | orjson.OPT_SORT_KEYS


def dumps(value: Any, sort_keys: bool = False) -> bytes:
    """``value`` as compact UTF-8 JSON (``value`` holds no NaN or infinity: see above)."""
    if orjson is not None:
        try:
            return orjson.dumps(value, option=_SORTED if sort_keys else _OPTIONS)
        except TypeError:  # orjson.JSONEncodeError too: the standard library decides
            pass
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(body: bytes) -> Any:
    """Decode UTF-8 JSON (never UTF-16/32; NaN and Infinity refused): ValueError or RecursionError when it is not."""
    if orjson is not None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass  # the standard library's verdict (it accepts a lone surrogate escape, for one)
    return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
