"""The rules a read relies on, by name: what the audit counts and what enforcement switches off.

Each filter condition names one operator and one or more rules (docs/semantics.md, "Audit
rules"); the read's other options add theirs. A read relying on none of them uses ``plain``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..read.relative import RELATIVE
from ..replica.schema import Schema

_TEXT_TYPES = {"text"}
_NEGATIONS = {"is_not", "not_in", "not_contains", "type_is_not", "name_not_contains", "not_between"}
_RANGES = {"less_than", "greater_than", "between", "not_between"}
_PATTERNS = {"contains", "not_contains", "starts_with", "ends_with"}
#: Every rule name, as docs/semantics.md lists them.
RULES = ("text-match", "exact-match", "range", "null-negation", "relative-date", "entity-link",
         "multi-entity", "deep-path", "sort", "archived-projects", "retired-rows", "plain")
#: The operator label of a rule that no filter condition brings.
NO_OPERATOR = "-"


def read_rules(schema: Schema, args: Any) -> set[tuple[str, str]]:
    """(operator, rule) pairs the read ``args`` relies on (``(-, plain)`` when none)."""
    out: set[tuple[str, str]] = set()
    if not isinstance(args, Mapping):
        return {(NO_OPERATOR, "plain")}
    entity_type = args.get("type")
    filters = args.get("filters")
    if isinstance(entity_type, str):
        for path, relation in _conditions(filters):
            out |= {(relation, rule) for rule in condition_rules(schema, entity_type, path, relation)}
    if args.get("sorts"):
        out.add((NO_OPERATOR, "sort"))
    if args.get("include_archived_projects") is False:
        out.add((NO_OPERATOR, "archived-projects"))
    if args.get("return_only") == "retired":
        out.add((NO_OPERATOR, "retired-rows"))
    return out or {(NO_OPERATOR, "plain")}


def rule_names(pairs: set[tuple[str, str]]) -> set[str]:
    return {rule for _op, rule in pairs}


def condition_rules(schema: Schema, entity_type: str, path: str, relation: str) -> set[str]:
    """The rules one condition relies on."""
    parts = path.split(".")
    rules: set[str] = set()
    if len(parts) > 1:
        rules.add("deep-path")
    owner, name = (parts[-2], parts[-1]) if len(parts) >= 3 else (entity_type, parts[0])
    fschema = schema.field(owner, name)
    data_type = fschema.data_type if fschema is not None else "unknown"
    if relation in RELATIVE:
        rules.add("relative-date")
    elif data_type == "entity":
        rules.add("entity-link")
    elif data_type == "multi_entity":
        rules.add("multi-entity")
    elif relation in _RANGES:
        rules.add("range")
    elif data_type in _TEXT_TYPES or relation in _PATTERNS:
        rules.add("text-match")
    else:
        rules.add("exact-match")
    if relation in _NEGATIONS:
        rules.add("null-negation")
    return rules


def uses_relative(args: Any) -> bool:
    """Whether a read filters on a relative date (sampled at a higher rate)."""
    filters = args.get("filters") if isinstance(args, Mapping) else None
    return any(relation in RELATIVE for _path, relation in _conditions(filters))


def _conditions(group: Any, depth: int = 0) -> list[tuple[str, str]]:
    """(path, relation) of every condition in a filters tree."""
    if not isinstance(group, Mapping) or depth > 32:
        return []
    out: list[tuple[str, str]] = []
    for cond in group.get("conditions") or []:
        if isinstance(cond, Mapping) and "conditions" in cond:
            out += _conditions(cond, depth + 1)
        elif isinstance(cond, Mapping) and isinstance(cond.get("path"), str) and isinstance(cond.get("relation"), str):
            out.append((cond["path"], cond["relation"]))
    return out
