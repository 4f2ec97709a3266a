"""Alembic migrations of the byok-plugin store, run by :mod:`byok_plugin.store.migrate`.

Revisions are linear and numbered (``0001``, ``0002``...): a new table or column is a new revision
whose ``down_revision`` is the previous number.

May import: byok_plugin.core, byok_plugin.store.
"""
