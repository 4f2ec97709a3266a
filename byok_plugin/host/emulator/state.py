"""What an emulator knows and remembers: the keys it accepts, the faults to inject, the calls seen.

One :class:`EmulatorState` belongs to one emulator; it is shared between the server's thread and the
test (or demo) that drives it, so every method takes a lock. Keys are kept only as SHA-256
fingerprints: the state never holds a key in clear, and a recorded call names a key by its label
(given when the key was registered) or its fingerprint.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from byok_plugin.host.emulator.faults import Fault, FaultKind, key_fingerprint

PROVIDERS = ("openai", "anthropic", "google", "mistral", "exa")


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One request the emulator received.

    :param provider: which provider's API was called.
    :param method: HTTP method.
    :param path: the provider-relative path, e.g. ``/v1/chat/completions``.
    :param model: the model asked for (``None`` for listings; the search type for Exa).
    :param key_label: the label the key was registered with, ``None`` for an unknown/missing key.
    :param key_fingerprint: :func:`key_fingerprint` of the key sent, ``None`` when none was sent.
    :param stream: whether a stream was asked for.
    :param status: the HTTP status answered.
    :param fault: the fault injected, if any.
    :param body: the parsed JSON request body (``None`` for a GET or unparsable body).
    """

    provider: str
    method: str
    path: str
    model: str | None
    key_label: str | None
    key_fingerprint: str | None
    stream: bool
    status: int
    fault: FaultKind | None = None
    body: Mapping[str, Any] | None = field(default=None, repr=False)
    at: float = field(default_factory=time.time)

    def used_key(self, api_key: str) -> bool:
        """True when this call was made with ``api_key``."""
        return self.key_fingerprint == key_fingerprint(api_key)


class EmulatorState:
    """Keys, faults and the call log of one emulator.

    :param accept_any_key: accept every non-empty key (an explicit choice, e.g. for a demo); keys
        registered with :meth:`add_key` still get their label in the call log.
    """

    def __init__(self, *, accept_any_key: bool = False) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, dict[str, str]] = {p: {} for p in PROVIDERS}
        self._faults: list[list[Any]] = []  # [fault, remaining]
        self._calls: list[RecordedCall] = []
        self._epoch = 0
        self._answered_as: dict[tuple[str, str], str] = {}
        self.accept_any_key = accept_any_key

    # keys ---------------------------------------------------------------------------------------
    def add_key(self, provider: str, api_key: str, label: str | None = None) -> str:
        """Accept ``api_key`` for ``provider``; returns the label calls will be recorded with."""
        if provider not in self._keys:
            raise ValueError(
                f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"
            )
        if not api_key:
            raise ValueError(f"an empty key for {provider} cannot be registered")
        fingerprint = key_fingerprint(api_key)
        label = label or f"{provider}-key-{fingerprint[:8]}"
        with self._lock:
            self._keys[provider][fingerprint] = label
        return label

    def add_keys(self, keys: Iterable[tuple[str, str]]) -> None:
        """Register ``(provider, key)`` pairs (labels default to the fingerprint)."""
        for provider, api_key in keys:
            self.add_key(provider, api_key)

    def new_key(self, provider: str, label: str | None = None) -> str:
        """Make up a random key for ``provider``, register it and return it (for tests and demos)."""
        prefixes = {
            "openai": "sk-emu-",
            "anthropic": "sk-ant-emu-",
            "google": "AIzaEmu",
            "mistral": "emu",
            "exa": "exa-emu-",
        }
        api_key = prefixes.get(provider, "emu-") + secrets.token_urlsafe(24)
        self.add_key(provider, api_key, label)
        return api_key

    def clear_keys(self) -> None:
        with self._lock:
            for keys in self._keys.values():
                keys.clear()

    def remove_key(self, provider: str, api_key: str) -> None:
        with self._lock:
            self._keys.get(provider, {}).pop(key_fingerprint(api_key), None)

    def check_key(self, provider: str, api_key: str | None) -> tuple[bool, str | None, str | None]:
        """``(accepted, label, fingerprint)`` for a key received by ``provider``'s API."""
        if not api_key:
            return False, None, None
        fingerprint = key_fingerprint(api_key)
        with self._lock:
            label = self._keys.get(provider, {}).get(fingerprint)
        return (label is not None or self.accept_any_key), label, fingerprint

    # model names --------------------------------------------------------------------------------
    def answer_model_as(self, provider: str, asked: str, answered: str) -> None:
        """Name the model ``answered`` in replies to requests for ``asked``, as real providers
        answer with a dated snapshot (``gpt-4o-mini`` -> ``gpt-4o-mini-2024-07-18``). By default
        a reply echoes the model asked for."""
        if provider not in self._keys:
            raise ValueError(
                f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}"
            )
        with self._lock:
            self._answered_as[(provider, asked)] = answered

    def answered_model(self, provider: str, asked: str) -> str:
        """The model name a reply to a request for ``asked`` carries."""
        with self._lock:
            return self._answered_as.get((provider, asked), asked)

    def clear_model_names(self) -> None:
        with self._lock:
            self._answered_as.clear()

    # faults -------------------------------------------------------------------------------------
    def add_fault(self, fault: Fault) -> Fault:
        """Inject ``fault`` into the next matching calls (rules apply in the order added)."""
        with self._lock:
            self._faults.append([fault, fault.times])
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def take_fault(self, provider: str, path: str, fingerprint: str | None) -> Fault | None:
        """The first fault matching this call, using up one of its times."""
        with self._lock:
            for entry in self._faults:
                fault: Fault = entry[0]
                remaining = entry[1]
                if fault.matches(provider, path, fingerprint):
                    if remaining is not None:
                        remaining -= 1
                        if remaining <= 0:
                            self._faults.remove(entry)
                        else:
                            entry[1] = remaining
                    return fault
        return None

    @property
    def pending_faults(self) -> list[Fault]:
        with self._lock:
            return [entry[0] for entry in self._faults]

    # call log -----------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Bumped by every :meth:`clear_calls`: a request that arrived before the last clear (a
        slow answer finishing late) is not recorded into the new log."""
        with self._lock:
            return self._epoch

    def record(self, call: RecordedCall, *, epoch: int | None = None) -> None:
        with self._lock:
            if epoch is None or epoch == self._epoch:
                self._calls.append(call)

    def calls(
        self, provider: str | None = None, *, api_key: str | None = None, label: str | None = None
    ) -> list[RecordedCall]:
        """The calls received so far, oldest first, optionally only one provider's or key's."""
        fingerprint = key_fingerprint(api_key) if api_key is not None else None
        with self._lock:
            calls = list(self._calls)
        return [
            c
            for c in calls
            if (provider is None or c.provider == provider)
            and (fingerprint is None or c.key_fingerprint == fingerprint)
            and (label is None or c.key_label == label)
        ]

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()
            self._epoch += 1

    def reset(self, *, keys: bool = False) -> None:
        """Forget faults, calls and model names (and keys, with ``keys=True``)."""
        self.clear_faults()
        self.clear_calls()
        self.clear_model_names()
        if keys:
            self.clear_keys()
