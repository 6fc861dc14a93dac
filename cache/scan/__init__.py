"""The scanner: primes the replica from SG and reconciles it by ``updated_at``
(:mod:`.scanner`), and the schema tools behind ``sgcache-schema-dump`` and
``sgcache-schema-filter`` (:mod:`.schematools`)."""

#: Rows per request and per transaction.
PAGE_SIZE = 500
#: Seconds a reconcile pass re-reads before each type's watermark.
DEFAULT_OVERLAP = 120.0
