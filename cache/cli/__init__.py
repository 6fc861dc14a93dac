"""The command-line programs (``sgcache-scan``, ``sgcache-ingest-events``, ``sgcache-reprocess``,
``sgcache-proxy``; the schema tools live in :mod:`cache.scan.schematools`). pyproject.toml
installs each as a console command; ``scripts/`` runs them from a checkout (:mod:`.launch`).

This package and :mod:`.launch` import nothing else, so that an interpreter without the
dependencies can still say what is missing.
"""
