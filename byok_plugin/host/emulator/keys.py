"""The emulator's keys file: which keys it accepts, one ``provider[:label]=KEY`` a line.

Keys are never given on a command line; ``byok emulator --keys-file PATH`` (or ``-`` for stdin)
reads them from here. Blank lines and lines starting with ``#`` are ignored. A malformed line is
reported by file and line number, never by any part of its content (a bare key on a line, even one
with ``=`` or ``:`` in it, must not be echoed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from byok_plugin.host.emulator.state import PROVIDERS


class KeysFileError(ValueError):
    """The keys file is malformed; the message names the file and line, not the key."""


@dataclass(frozen=True, slots=True)
class EmulatorKey:
    provider: str
    api_key: str = field(repr=False)
    label: str | None = None


def parse_keys(text: str, source: str = "<keys>") -> list[EmulatorKey]:
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, api_key = line.partition("=")
        provider, _, label = name.strip().partition(":")
        provider, label, api_key = provider.strip().lower(), label.strip(), api_key.strip()
        if not sep or not api_key:
            raise KeysFileError(f"{source}, line {number}: expected provider[:label]=KEY")
        if provider not in PROVIDERS:
            # the name is not repeated: a bare key holding "=" (base64) would be echoed as one
            raise KeysFileError(
                f"{source}, line {number}: unknown provider before '='; expected one of "
                f"{', '.join(PROVIDERS)}"
            )
        keys.append(EmulatorKey(provider, api_key, label or None))
    return keys
