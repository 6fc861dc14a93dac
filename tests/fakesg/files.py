"""The fake SG's file side: upload forms, a storage bucket standing in for S3, and attachment downloads.

shotgun_api3 uploads one of two ways, by ``info``'s ``s3_direct_uploads_enabled`` and
``s3_enabled_upload_types``:

* to storage: ``POST /upload/api_get_upload_link_info`` (a form) answers ``1\\n<upload url>\\n...``;
  the client ``PUT``s the file to that URL (here ``<storage_url>/<key>``, another host name than
  the site's, as S3 is), then ``POST /upload/api_link_file`` makes the Attachment and links it;
* to the site: ``POST /upload/upload_file`` (multipart, the file inside).

A download is ``GET /file_serve/attachment/<id>``, which redirects to the stored object
(a signed S3 URL on the real service). Form answers are SG's text: ``1:<id>`` or ``0<why>``.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import threading
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .site import FakeSite

#: (status, headers, body) of one HTTP answer.
Reply = tuple[int, list[tuple[str, str]], bytes]
#: What the fake offers for direct uploads when ``s3_uploads`` is on (shotgun_api3's upload routing).
S3_UPLOAD_TYPES = {"Version": ["sg_uploaded_movie"], "Attachment": "*"}
STORAGE_PATH = "/storage/"


class FakeFiles:
    """Uploads, the bucket and downloads of one :class:`FakeSite` (``site.files``)."""

    def __init__(self, site: FakeSite) -> None:
        self.site = site
        #: The site's URL as clients name it (attachment URLs) and the storage's base URL.
        self.site_url = ""
        self.storage_url = ""
        #: Offer direct uploads to storage in ``info`` (as S3-backed sites do).
        self.s3_uploads = False
        self.bucket: dict[str, bytes] = {}
        #: Attachment id -> (display name, bucket key).
        self.attachments: dict[int, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._next_id = 0

    def configure(self, site_url: str, storage_url: str, s3_uploads: bool = True) -> None:
        self.site_url, self.storage_url, self.s3_uploads = site_url.rstrip("/"), storage_url.rstrip("/"), s3_uploads

    def info_keys(self) -> dict[str, Any]:
        """The upload keys of ``info``."""
        keys: dict[str, Any] = {"s3_uploads_enabled": self.s3_uploads}
        if self.s3_uploads:
            keys.update(s3_direct_uploads_enabled=True, s3_enabled_upload_types=S3_UPLOAD_TYPES)
        return keys

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply | None:
        """Answer a file request; None when it is none of the file endpoints (the server echoes it)."""
        route = path.split("?", 1)[0]
        if method == "PUT" and route.startswith(STORAGE_PATH):
            key = route[len(STORAGE_PATH):]
            with self._lock:
                self.bucket[key] = body
            return 200, [("ETag", f'"{hashlib.md5(body).hexdigest()}"')], b""
        if method == "GET" and route.startswith(STORAGE_PATH):
            with self._lock:
                data = self.bucket.get(route[len(STORAGE_PATH):])
            return (404, [], b"no such key") if data is None else (200, [("Content-Type", "application/octet-stream")], data)
        if method == "GET" and route.startswith("/file_serve/attachment/"):
            with self._lock:
                found = self.attachments.get(int(route.rsplit("/", 1)[1] or 0))
            if found is None:
                return None  # an id never stored echoes, as any other request does
            return 302, [("Location", f"{self.storage_url}/{found[1]}")], b""
        name = route[len("/upload/"):] if route.startswith("/upload/") else ""
        if method != "POST" or name not in ("api_get_upload_link_info", "api_link_file", "upload_file"):
            return None
        form = _form(headers.get("content-type", ""), body)
        try:
            self.site.authenticate_form(form)
        except Exception as exc:  # noqa: BLE001 - SG answers a form with text, not an envelope
            return _text(f"0{exc}")
        if name == "api_get_upload_link_info":
            key = f"{uuid.uuid4().hex}/{form.get('filename', 'file')}"
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            return _text(f"1\n{self.storage_url}/{key}\n{stamp}\n{form.get('upload_type', 'Attachment')}\n{key}")
        if name == "api_link_file":
            lines = str(form.get("upload_link_info", "")).split("\n")
            key = urllib.parse.urlsplit(lines[1]).path[len(STORAGE_PATH):] if len(lines) > 1 else ""
            with self._lock:
                if key not in self.bucket:
                    return _text("0upload not found in storage")
            return self._link(form, key, str(form.get("display_name") or key.rsplit("/", 1)[-1]))
        if name == "upload_file":
            data = form.get("file")
            if not isinstance(data, bytes):
                return _text("0no file")
            key = f"{uuid.uuid4().hex}/{form.get('display_name', 'file')}"
            with self._lock:
                self.bucket[key] = data
            return self._link(form, key, str(form.get("display_name") or "file"))
        return _text(f"0unknown upload endpoint {name}")

    def _link(self, form: dict[str, Any], key: str, display_name: str) -> Reply:
        """Make the Attachment and set the entity's field to it (SG's url-field value)."""
        with self._lock:
            self._next_id += 1
            attachment_id = self._next_id
            self.attachments[attachment_id] = (display_name, key)
        field = form.get("field_name")
        if field:
            value = {"type": "Attachment", "id": attachment_id, "name": display_name, "link_type": "upload",
                     "content_type": "application/octet-stream",
                     "url": f"{self.site_url}/file_serve/attachment/{attachment_id}"}
            self.site.update_direct(str(form.get("entity_type")), int(form.get("entity_id") or 0), {str(field): value})
        return _text(f"1:{attachment_id}\n")


def _text(text: str) -> Reply:
    return 200, [("Content-Type", "text/plain; charset=utf-8")], text.encode("utf-8")


def _form(content_type: str, body: bytes) -> dict[str, Any]:
    """A urlencoded or multipart form: text fields as str, file parts as bytes."""
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
        out: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            out[str(name)] = payload if part.get_filename() else payload.decode("utf-8", "replace")
        return out
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
