"""Uploads through the site change rows without an API3 write the proxy could learn from.

shotgun_api3 uploads with form POSTs to the site's ``/upload/...``: ``upload_file`` and
``publish_thumbnail`` carry the file; after a direct upload to storage, ``api_link_file`` links
it. SG then creates an Attachment and sets the entity's field (and ``updated_at``). None of that
is API3, so SG's answer teaches the replica nothing; instead the types such a form may change are
marked pending (:mod:`cache.replica.pending`) once SG answered (unless it refused the form:
:func:`refused`) or the request failed while the client waited (not once it hung up), and their reads pass (``pending-write``) until the ingester has the upload's events. The uploading tool
reads its upload back from SG, never the replica's copy from before it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .routing import router_path

#: Upload endpoints that change no entity: they hand out storage URLs, or read.
LINKLESS = frozenset({"api_get_upload_link_info", "api_get_upload_link_for_part",
                      "api_complete_multipart_upload", "get_thumbnail_url"})
#: SG's type for uploaded files, always touched by an upload that links.
ATTACHMENT = "Attachment"


def is_upload(method: str, path: str) -> bool:
    """Whether a request to the site is an upload form that may change entities: a ``POST`` under
    ``/upload/`` as SG's router reads the path (Rails squeezes doubled slashes and drops a trailing
    one before routing: ``//upload/upload_file`` is ``upload_file``); percent-escapes and letter case
    are read loosely too (a path read as an upload that is not one only makes reads pass)."""
    route = router_path(path).lower()
    return method == "POST" and route.startswith("/upload/") and route.rsplit("/", 1)[-1] not in LINKLESS


def refused(status: int, body: bytes | None) -> bool:
    """Whether SG's answer to an upload form says it changed nothing: an HTTP 4xx, or a 200 whose
    text does not start with ``1`` (SG's success; shotgun_api3 takes nothing else for one), such
    as ``0`` and the reason for credentials SG refused. ``body`` None: not read (not refused)."""
    if 400 <= status < 500:
        return True
    return status == 200 and body is not None and not body.startswith(b"1")


def changed_types(form: Mapping[str, str]) -> set[str] | None:
    """The entity types an upload form may change (its ``entity_type``, or ``share_thumbnail``'s
    ``entities`` such as ``Shot_12,Asset_3``), plus Attachment; None when it names none: any type."""
    types = set()
    named = form.get("entity_type")
    if isinstance(named, str) and named.strip():
        types.add(named.strip())
    for item in str(form.get("entities") or "").split(","):
        name, sep, _id = item.strip().rpartition("_")
        if sep and name:
            types.add(name)
    return types | {ATTACHMENT} if types else None
