"""The platform's own key pool, read from the environment: several keys per provider.

For provider ``openai`` (prefix ``OPENAI``; the catalog names each provider's prefixes, Google has
``GEMINI`` and ``GOOGLE``), in this order, duplicates dropped:

- ``BYOK_PLATFORM_KEYS_OPENAI=k1,k2,...``
- ``OPENAI_API_KEY``
- ``OPENAI_API_KEY_1``, ``OPENAI_API_KEY_2``, ... (any number; sorted by number, gaps allowed)

Keys are handed out round-robin; a key the provider refused (429, auth failure) is put in
cooldown and skipped until it ends. A key's safe reference is the variable it came from
(``env:OPENAI_API_KEY_2``, ``env:BYOK_PLATFORM_KEYS_OPENAI[1]``): keys themselves never appear in
a repr, a log line or an error.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["PlatformKey", "PlatformKeyPool", "mask_key"]

_NUMBERED = re.compile(r"^(?P<prefix>[A-Z0-9]+)_API_KEY_(?P<n>\d+)$")


def mask_key(api_key: str) -> str:
    """A display hint that shows too little of a key to use it: ``sk-pro...abcd``."""
    if len(api_key) < 12:
        return "..." + api_key[-2:] if len(api_key) > 4 else "****"
    return f"{api_key[:6]}...{api_key[-4:]}"


@dataclass(frozen=True, slots=True)
class PlatformKey:
    """One platform key and its safe reference."""

    provider: str
    key_id: str
    api_key: str = field(repr=False)

    @property
    def hint(self) -> str:
        return mask_key(self.api_key)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def keys_from_environ(
    environ: Mapping[str, str], providers: Mapping[str, Sequence[str]]
) -> dict[str, list[PlatformKey]]:
    """Collect the platform keys of each provider from the environment.

    :param providers: provider -> its variable prefixes (``{"google": ["GEMINI", "GOOGLE"]}``).
    """
    pools: dict[str, list[PlatformKey]] = {}
    numbered: dict[str, list[tuple[int, str]]] = {}
    for name in environ:
        match = _NUMBERED.match(name)
        if match:
            numbered.setdefault(match["prefix"], []).append((int(match["n"]), name))
    for provider, prefixes in providers.items():
        candidates: list[tuple[str, str]] = []
        pool_var = f"BYOK_PLATFORM_KEYS_{provider.upper()}"
        candidates += [
            (f"env:{pool_var}[{i}]", value)
            for i, value in enumerate(_split(environ.get(pool_var, "")))
        ]
        for prefix in prefixes:
            plain = f"{prefix}_API_KEY"
            candidates.append((f"env:{plain}", environ.get(plain, "").strip()))
            candidates += [
                (f"env:{name}", environ[name].strip())
                for _, name in sorted(numbered.get(prefix, []))
            ]
        found: list[PlatformKey] = []
        seen: set[str] = set()
        for key_id, value in candidates:
            if value and value not in seen:
                seen.add(value)
                found.append(PlatformKey(provider=provider, key_id=key_id, api_key=value))
        if found:
            pools[provider] = found
    return pools


class PlatformKeyPool:
    """Round-robin over each provider's platform keys, skipping keys in cooldown.

    Thread-safe; its state (the next index, the cooldowns) belongs to one process. The default
    resolution shares cooldowns between workers through the store
    (:mod:`byok_plugin.resolution.platform_cooldowns`) and applies those of others here.
    """

    def __init__(
        self,
        keys: Mapping[str, Iterable[PlatformKey]],
        *,
        cooldown_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = {provider: tuple(items) for provider, items in keys.items() if items}
        self._by_id = {k.key_id: k for items in self._keys.values() for k in items}
        self._by_secret = {k.api_key: k for items in self._keys.values() for k in items}
        self._next = dict.fromkeys(self._keys, 0)
        self._cooling: dict[str, float] = {}
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        providers: Mapping[str, Sequence[str]],
        *,
        cooldown_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> PlatformKeyPool:
        return cls(
            keys_from_environ(environ, providers), cooldown_seconds=cooldown_seconds, clock=clock
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{p}={len(k)}" for p, k in sorted(self._keys.items()))
        return f"PlatformKeyPool({sizes})"

    def providers(self) -> list[str]:
        return sorted(self._keys)

    def size(self, provider: str) -> int:
        return len(self._keys.get(provider, ()))

    def acquire(self, provider: str) -> PlatformKey | None:
        """The next key of the provider not in cooldown; ``None`` if it has none usable."""
        keys = self._keys.get(provider)
        if not keys:
            return None
        now = self._clock()
        with self._lock:
            start = self._next[provider]
            for step in range(len(keys)):
                key = keys[(start + step) % len(keys)]
                until = self._cooling.get(key.key_id)
                if until is not None:
                    if until > now:
                        continue
                    del self._cooling[key.key_id]
                self._next[provider] = (start + step + 1) % len(keys)
                return key
        return None

    def lookup(
        self, *, key_id: str | None = None, api_key: str | None = None
    ) -> PlatformKey | None:
        """The pool's key with this reference, or holding this secret."""
        if key_id is not None:
            return self._by_id.get(key_id)
        if api_key is not None:
            return self._by_secret.get(api_key)
        return None

    def cool_down(self, key_id: str, seconds: float | None = None) -> bool:
        """Skip a key for ``seconds`` (the pool's cooldown by default). False if not a pool key."""
        if key_id not in self._by_id:
            return False
        with self._lock:
            self._cooling[key_id] = self._clock() + (self._cooldown if seconds is None else seconds)
        return True

    def cooling(self, provider: str) -> tuple[int, float]:
        """How many of the provider's keys are cooling down, and seconds until the first is ready."""
        now = self._clock()
        waits = [
            until - now
            for key in self._keys.get(provider, ())
            if (until := self._cooling.get(key.key_id)) is not None and until > now
        ]
        return len(waits), (min(waits) if waits else 0.0)
