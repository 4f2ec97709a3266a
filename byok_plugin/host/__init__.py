"""The reference host engine.

It reaches byok-plugin only through the public hook contract (``byok_hookspecs``), exactly as a
third-party engine would; ``tests/test_architecture.py`` fails when it imports anything else of
``byok_plugin`` outside ``byok_plugin.host``.

May import: nothing (only byok_hookspecs: a host reaches the plugin through the hooks).
"""
