"""How the replica lowers text for case-insensitive matches and sorts, on every database.

SG keeps its data in PostgreSQL, whose ``lower()`` (and ``ILIKE``) in a UTF-8 locale lowers one
code point at a time with Unicode's simple case mapping (libc's ``towlower``): a final 'Σ' is
'σ' and 'İ' is 'i'. Python's ``str.lower`` applies the full mapping, with context ('ς' at a
word's end, 'İ' as the two code points 'i̇'). Both databases lower as PostgreSQL does: on
PostgreSQL its own ``lower()`` (a probe at start checks the database's locale does so,
``Dialect.lower_problem``), on SQLite the registered ``sg_lower`` (:func:`lower_simple`); a
filter's value is lowered the same way (``Dialect.lower_value``).
"""

from __future__ import annotations

import functools

#: The last code point the lowering table looks at: every cased letter is below it.
LAST_CASED = 0x1FFFF
#: The rule :func:`lower_simple` applies, kept in a replica's state: SQLite's expression indexes
#: on ``sg_lower`` are rebuilt when a replica was indexed with another (cache/replica/store.py).
LOWERING = "simple"


@functools.cache
def _lower_table() -> dict[int, str]:
    """Each code point Python lowers, to its simple lower-case mapping (Unicode's one-to-one
    mapping): for 'İ', whose full mapping is 'i' + U+0307, the first of them."""
    table = {}
    for code in range(LAST_CASED + 1):
        char = chr(code)
        low = char.lower()
        if low != char:
            table[code] = low[0]
    return table


def lower_simple(text: str) -> str:
    """``text`` lowered one code point at a time with Unicode's simple case mapping (as
    PostgreSQL's lower() does in a UTF-8 locale)."""
    return text.lower() if text.isascii() else text.translate(_lower_table())
