"""Credential resolution: which key one provider call uses, and who may use it.

- :mod:`~byok_plugin.resolution.resolver`: :class:`Resolver`, what ``byok_resolve_credential``
  answers (the workspace's key, its organization's, a platform key as fallback, or none);
- :mod:`~byok_plugin.resolution.platform_keys`, :mod:`~byok_plugin.resolution.platform_cooldowns`:
  the platform's own key pool and the keys resting after a rate limit;
- :mod:`~byok_plugin.resolution.workspace_settings`, :mod:`~byok_plugin.resolution.organizations`:
  each workspace's BYOK settings, and the organizations whose keys their workspaces share;
- :mod:`~byok_plugin.resolution.background_writes`: audit and cooldown writes kept off the call
  path.

May import: byok_plugin.core, byok_plugin.store, byok_plugin.keys, byok_plugin.billing,
byok_plugin.settings.
"""
