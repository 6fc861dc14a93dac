"""The scanner: primes the replica from SG and reconciles it by ``updated_at``
(:mod:`.scanner`), and the schema tools behind ``scripts/schema-dump`` and
``scripts/schema-filter`` (:mod:`.schematools`)."""
