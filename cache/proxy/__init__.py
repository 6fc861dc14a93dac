"""The proxy's policies, free of mitmproxy: ``addons/sgcache.py`` decodes a flow, dispatches here, answers.

- :mod:`.upstream`: the one HTTP client for SG (writes sent once, rows read back).
"""
