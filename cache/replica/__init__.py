"""The replica: the SQL copy of the one SG site it belongs to.

- :mod:`.schema`, :mod:`.fieldtypes`: which types and fields are cached, and how each SG data
  type is stored (the one place that decides).
- :mod:`.store`: the tables made from the schema at run time (SQLAlchemy Core), the entity
  registry, state keys (:mod:`.statekeys`), primed types and fields.
- :mod:`.writes`: the one write path (batches flushed with upserts) that the proxy, the
  ingester and the scanner all use.
- :mod:`.pairs`, :mod:`.effects`: SG's paired fields, and what a write changes besides its own
  fields; :mod:`.pending`: the pending-write markers that make reads pass until the ingester
  has a write's events; :mod:`.fetchqueue`: entities to read again from SG.
- :mod:`.site`: the site the replica copies (bound at the first prime, checked by every program).
- :mod:`.dialect`: every difference between SQLite and PostgreSQL.
"""
