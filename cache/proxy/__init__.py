"""The proxy's policies, free of mitmproxy: ``addons/sgcache.py`` decodes a flow, dispatches here, answers.

- :mod:`.api3`: decoding an API3 request body, and SG's error envelope.
- :mod:`.service`: the replica as the proxy uses it: reads, and the facade for the two below.
- :mod:`.breaker`: the database circuit breaker (repeated failures: requests pass ``db-backoff``).
- :mod:`.learning`: what the proxy writes into the replica after a write (SG's answer, or markers).
- :mod:`.dbwait`: a write's database steps, each waited for at most ``sgcache_write_wait``.
- :mod:`.auth`: the credentials SG accepted, per site; :mod:`.relay`: where a client may make
  the proxy connect (no open relay).
- :mod:`.flowstate`: what the addon knows of one flow between its hooks (one typed object).
- :mod:`.routing`: which flows are the site's API3 calls; which hosts mitmproxy decrypts.
- :mod:`.replica`: opening the replica, failing open while its database is down.
- :mod:`.reads`: answering a read from the replica (timeouts, budgets, slow clients).
- :mod:`.sending`: a write's trip: sent to SG exactly once, then learnt from.
- :mod:`.upstream`: the one HTTP client for SG (writes sent once, rows read back).
- :mod:`.outage`: when SG counts as down, and for how long the proxy answers offline.
- :mod:`.offline`: the copy of SG's ``info`` answer served while SG is down.
- :mod:`.credentials`: which answers may teach the credential cache (:mod:`cache.proxy.auth`).
- :mod:`.answers`: the answers the proxy makes itself, and their ``X-SGCache`` header.
- :mod:`.metrics`: the hit and pass counters ``info()["sgcache"]`` reports.

Everything here runs without a proxy: the unit tests drive it with plain objects.
"""
