"""Provider keys: stored encrypted, read back for one call, checked, rotated.

- :mod:`~byok_plugin.keys.service`: :class:`KeyService`, the key operations behind the CLI, the
  HTTP API and the hooks (add, rotate, disable, delete, list, check);
- :mod:`~byok_plugin.keys.envelope`, :mod:`~byok_plugin.keys.kms`: envelope encryption under a
  built-in, local, Vault Transit or AWS KMS key-encryption key;
- :mod:`~byok_plugin.keys.access`, :mod:`~byok_plugin.keys.reader`: decrypting a key for one call;
  the read-only SQLite reader;
- :mod:`~byok_plugin.keys.rewrap`: re-encrypting every key under a new master or data key;
- :mod:`~byok_plugin.keys.validation`, :mod:`~byok_plugin.keys.health`: asking a provider whether a
  key works, and remembering the answer;
- :mod:`~byok_plugin.keys.listener`: PostgreSQL LISTEN/NOTIFY of key changes.

May import: byok_plugin.core, byok_plugin.store, byok_plugin.settings.
"""
