"""The dump file of ``scripts/dump-data`` and ``scripts/load-data``: JSON lines in SG's wire format.

Line 1 is the header (a JSON object with ``sgcache_dump``: the format version)::

    {"sgcache_dump": 1, "site": "https://studio.shotgunstudio.com:443", "schema_digest": "...",
     "event_cursor": 1234, "projects": null, "redacted": false,
     "types": {"Shot": {"digest": "...", "complete": true, "watermark": "2024-05-01T12:00:00Z",
                        "unprimed": []}, ...}}

- ``site``: the site the dumped replica copies (None when it was never bound); a replica bound to
  another site refuses the file.
- ``digest`` (per type): the cached fields of the type with their data types and link types, and
  the type's identifier field. A replica whose schema gives another digest for a type refuses the
  file (its rows would not hold the same fields). ``schema_digest`` covers every cached type of
  the dumping replica's schema (informational).
- ``complete``: the replica had the type primed, the dump did not filter it by project, and no
  fetch or pending-write marker was open for it; only such types may be marked primed on load.
- ``event_cursor``: the dumped replica's event cursor, consistent with the rows (one snapshot).

Every other line is one entity: ``type``, ``id``, ``_retired`` and every cached field of the type as
SG sends it (dates and datetimes as SG's strings; links as ``{"type", "id", "name"}``, ``name``
only when the replica knows it; multi_entity lists in SG's order, links to retired entities
included). Entities come type by type (sorted by name), in id order. Last come registry lines
(``"_registry": true``): retired entities that no row carries (another type's, or an entity the
replica only knows from links), so links to them stay hidden after a load.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import hmac
import io
import json
import os
import secrets
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from ..private import open_private
from ..replica import fieldtypes
from ..replica.schema import Schema

FORMAT = 1
RETIRED = "_retired"
REGISTRY = "_registry"

#: Data types whose values ``--redact`` replaces (see :class:`Redactor`).
REDACTED_TYPES = frozenset({"text", "url", "serializable"})
#: Keys of a ``url`` value that say what kind of link it is: never redacted.
URL_KEPT_KEYS = frozenset({"link_type", "content_type", "type", "id"})


class DumpError(ValueError):
    """A dump that cannot be written or a file that cannot be loaded (one line, for the user)."""


def type_digest(schema: Schema, entity_type: str) -> str:
    """A digest of the type's cached fields (data types, link types) and its identifier field."""
    entity = schema.entities[entity_type]
    fields = {name: [f.data_type, sorted(f.links)] for name, f in entity.fields.items()
              if fieldtypes.is_cached_type(f.data_type)}
    text = json.dumps({"fields": fields, "identifier": entity.name_field}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def schema_digest(schema: Schema) -> str:
    """A digest of every cached type's :func:`type_digest`."""
    text = json.dumps({t: type_digest(schema, t) for t in schema.entities}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def encode_line(record: Mapping[str, Any]) -> str:
    """One line of the file: compact JSON, keys sorted, non-ASCII kept (UTF-8)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"


class Redactor:
    """Replaces text with tokens: the same value gives the same token within one dump.

    A token is ``~`` and 16 hex digits of an HMAC-SHA256 of the value under a key made for the run
    (so tokens cannot be looked up in a dictionary of likely names, and two dumps do not share
    them). ``""`` and None are kept. What is replaced: every value of a ``text`` field; in a ``url``
    field every string except ``link_type``, ``content_type``, and a link's ``type``; in a
    ``serializable`` field every string (keys are kept); and every link's ``name`` (so it stays
    equal to the linked row's redacted identifier)."""

    def __init__(self, key: bytes | None = None):
        self._key = key if key is not None else secrets.token_bytes(32)

    def text(self, value: Any) -> Any:
        if not isinstance(value, str) or value == "":
            return value
        return "~" + hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:16]

    def value(self, data_type: str, value: Any) -> Any:
        """A field's value (as SG sends it) with its text replaced."""
        if data_type == "text":
            return self.text(value)
        if data_type == "url":
            return self._strings(value, URL_KEPT_KEYS)
        if data_type == "serializable":
            return self._strings(value, frozenset())
        return value

    def _strings(self, value: Any, kept: frozenset[str]) -> Any:
        if isinstance(value, dict):
            return {k: (v if k in kept else self._strings(v, kept)) for k, v in value.items()}
        if isinstance(value, list):
            return [self._strings(v, kept) for v in value]
        return self.text(value)


@contextlib.contextmanager
def open_output(path: str) -> Iterator[IO[str]]:
    """A text stream for the dump: ``-`` is stdout; a new file is mode 0600 (it holds the site's
    data); a name ending ``.gz`` is gzip-compressed."""
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    fd = open_private(path, os.O_WRONLY)
    os.ftruncate(fd, 0)
    with open(fd, "wb") as raw:
        binary: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="wb") if path.endswith(".gz") else raw
        with io.TextIOWrapper(binary, encoding="utf-8", newline="\n") as text:
            yield text


@contextlib.contextmanager
def open_input(path: str) -> Iterator[IO[str]]:
    """A text stream of a dump: ``-`` is stdin; a name ending ``.gz`` is read through gzip."""
    if path == "-":
        yield sys.stdin
        return
    if not Path(path).is_file():
        raise DumpError(f"no such file: {path}")
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as stream:
        yield stream


def read_header(stream: IO[str]) -> dict[str, Any]:
    """The header line of a dump, checked for the fields the loader needs."""
    line = stream.readline()
    try:
        header = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or "sgcache_dump" not in header:
        raise DumpError("not an sgcache dump: the first line is not its header")
    if header["sgcache_dump"] != FORMAT:
        raise DumpError(f"dump format {header['sgcache_dump']!r} is not supported (this version reads {FORMAT})")
    types = header.get("types")
    if not isinstance(types, dict) or not all(isinstance(v, dict) and "digest" in v for v in types.values()):
        raise DumpError("the dump's header has no valid 'types'")
    return header
