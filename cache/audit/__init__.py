"""The audit (shadow reads): a sample of hits is also read from SG, off the request path, and the
two answers compared; disagreements are counted per entity type, operator and rule, kept in the
replica's ``sgcache_audit`` table, and (``sgcache_audit_enforce``) switch their rules off.

- :mod:`.rules`: the rules a read uses (named in docs/semantics.md, "Audit rules").
- :mod:`.compare`: the two answers, with what SG leaves unordered normalised.
- :mod:`.table`: the disagreements kept and the rules switched off, in the database.
- :mod:`.shadow`: sampling, the rate limit, the bounded queue and the worker thread.
"""
