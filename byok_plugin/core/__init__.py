"""The core: what every room of byok-plugin shares, with no database and no network.

- :mod:`~byok_plugin.core.errors`: byok-plugin's error classes (all :class:`byok_hookspecs.ByokError`);
- :mod:`~byok_plugin.core.key_format`: workspace ids, provider names, labels and key shapes checked;
- :mod:`~byok_plugin.core.crypto`: the master key, the keyring and AES-GCM sealing of keys;
- :mod:`~byok_plugin.core.json_file`: JSON data files read with a clear error per JSON path.

May import: nothing (only byok_hookspecs and libraries).
"""
