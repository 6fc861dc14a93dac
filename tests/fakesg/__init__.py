"""A fake Shotgun/ShotGrid site (in-memory data + HTTP server), the oracle for end-to-end tests."""

from .schema_data import (
    basic_schema,
    basic_spec,
    field_schema,
    load_fixture_schema,
    make_entity_schema,
    make_schema,
)
from .server import FakeSGServer
from .site import (
    ERR_AUTH,
    ERR_BAD_REQUEST,
    ERR_NO_METHOD,
    ERR_NOT_FOUND,
    NULLS_SORT_SMALLEST,
    FakeSite,
    SGFault,
    fmt_dt,
    wire_filters,
)

__all__ = [
    "ERR_AUTH",
    "ERR_BAD_REQUEST",
    "ERR_NOT_FOUND",
    "ERR_NO_METHOD",
    "NULLS_SORT_SMALLEST",
    "FakeSGServer",
    "FakeSite",
    "SGFault",
    "basic_schema",
    "basic_spec",
    "field_schema",
    "fmt_dt",
    "load_fixture_schema",
    "make_entity_schema",
    "make_schema",
    "wire_filters",
]
