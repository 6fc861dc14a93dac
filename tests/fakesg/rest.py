"""A small part of SG's REST API for the fake site, enough for a tool that writes there and reads
back through API3: an access token for a script's credentials, and an entity's update, delete,
read, search and a field's deletion from the schema. Entity types are named as API3 names them
(``Shot``); SG's own REST names (``shots``) are not faked. Every call but the token needs
``Authorization: Bearer <token>``; what it does goes through the site's API3 methods with the
script's credentials (so it logs the same events)."""

from __future__ import annotations

import json
import secrets
import urllib.parse
from typing import Any

from .site import FakeSite, SGFault

PREFIX = "/api/v1/"


def handle(site: FakeSite, method: str, path: str, headers: dict[str, str],
           body: bytes) -> tuple[int, Any] | None:
    """(status, JSON payload or None for no content) for a REST request; None: not a REST path."""
    route = path.split("?", 1)[0]
    if not route.startswith(PREFIX):
        return None
    parts = [urllib.parse.unquote(p) for p in route[len(PREFIX):].split("/") if p]
    if parts == ["auth", "access_token"] and method == "POST":
        return _token(site, body)
    auth = site.rest_tokens.get(headers.get("authorization", "").removeprefix("Bearer ").strip())
    if auth is None:
        return 401, {"errors": [{"status": 401, "title": "Unauthorized"}]}
    try:
        return _entity(site, auth, method, parts, body)
    except SGFault as exc:
        return 400, {"errors": [{"status": 400, "title": str(exc)}]}
    except (ValueError, KeyError, TypeError) as exc:
        return 400, {"errors": [{"status": 400, "title": f"bad request: {exc}"}]}


def _token(site: FakeSite, body: bytes) -> tuple[int, Any]:
    form = dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace")))
    auth = {"script_name": form.get("client_id", ""), "script_key": form.get("client_secret", "")}
    if form.get("grant_type") != "client_credentials" or not site.accepts(auth):
        return 400, {"errors": [{"status": 400, "title": "invalid client credentials"}]}
    token = secrets.token_hex(16)
    site.rest_tokens[token] = auth
    return 200, {"token_type": "Bearer", "access_token": token, "expires_in": 600}


def _entity(site: FakeSite, auth: dict[str, str], method: str, parts: list[str], body: bytes) -> tuple[int, Any]:
    def call(name: str, params: dict[str, Any]) -> Any:
        reply = site.call(name, [auth, params])
        if reply.get("exception"):
            raise SGFault(str(reply.get("message")))
        return reply["results"]

    if parts[:1] == ["entity"] and len(parts) == 3 and parts[2] == "_search" and method == "POST":
        query = json.loads(body or b"{}")
        rows = call("read", {"type": parts[1], "return_fields": query.get("fields") or ["id"],
                             "filters": {"logical_operator": "and", "conditions": [
                                 {"path": f, "relation": r, "values": [v]} for f, r, v in query.get("filters", [])]},
                             "paging": {"entities_per_page": 500, "current_page": 1}})["entities"]
        return 200, {"data": [{"type": r["type"], "id": r["id"], "attributes": r} for r in rows]}
    if parts[:1] == ["entity"] and len(parts) == 3:
        entity_type, entity_id = parts[1], int(parts[2])
        if method in ("PUT", "PATCH"):
            values = json.loads(body)
            row = call("update", {"type": entity_type, "id": entity_id,
                                  "fields": [{"field_name": k, "value": v} for k, v in values.items()]})
            return 200, {"data": {"type": entity_type, "id": entity_id, "attributes": row}}
        if method == "GET":
            rows = call("read", {"type": entity_type, "return_fields": ["code"],
                                 "filters": {"logical_operator": "and", "conditions": [
                                     {"path": "id", "relation": "is", "values": [entity_id]}]},
                                 "paging": {"entities_per_page": 1, "current_page": 1}})["entities"]
            if not rows:
                return 404, {"errors": [{"status": 404, "title": "record not found"}]}
            return 200, {"data": {"type": entity_type, "id": entity_id, "attributes": rows[0]}}
        if method == "DELETE":
            call("delete", {"type": entity_type, "id": entity_id})
            return 204, None
    if parts[:1] == ["schema"] and len(parts) == 4 and parts[2] == "fields" and method == "DELETE":
        call("schema_field_delete", {"type": parts[1], "field_name": parts[3]})
        return 204, None
    return 404, {"errors": [{"status": 404, "title": "no such route in the fake"}]}
