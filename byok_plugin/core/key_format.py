"""Checks on what a user types before anything is stored, and the masked display hint.

A key that fails a check is refused with a message that says what is wrong and never quotes the
key. A key that passes but looks unusual (an admin key, an odd length) is stored with warnings.

Known key shapes (checked against the providers' documentation, November 2026):

| provider | required prefix | usual shape (otherwise a warning) |
|---|---|---|
| ``openai`` | ``sk-`` (and not ``sk-ant-``) | ``sk-proj-...``, ``sk-svcacct-...``, legacy ``sk-`` + 48 |
| ``anthropic`` | ``sk-ant-`` | ``sk-ant-api03-...`` (``sk-ant-admin01-`` cannot call models) |
| ``google`` | none enforced (formats are in transition) | ``AIza`` + 35 (standard), ``AQ.`` (auth keys) |
| ``mistral`` | none | 32 letters and digits |
| ``exa`` | none | a UUID |
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from byok_plugin.core.errors import InvalidInput, InvalidKeyFormat, UnknownProvider

__all__ = [
    "KNOWN_PROVIDERS",
    "MAX_KEY_LENGTH",
    "MIN_KEY_LENGTH",
    "KeyFormatCheck",
    "check_api_key",
    "check_key_id",
    "check_label",
    "check_provider",
    "check_workspace_id",
    "mask",
]

KNOWN_PROVIDERS: tuple[str, ...] = ("openai", "anthropic", "google", "mistral", "exa")
MIN_KEY_LENGTH = 20
MAX_KEY_LENGTH = 512
MAX_WORKSPACE_LENGTH = 200
MAX_LABEL_LENGTH = 64
DEFAULT_LABEL = "default"

_REQUIRED_PREFIX = {"openai": "sk-", "anthropic": "sk-ant-"}
_MISTRAL_RE = re.compile(r"^[A-Za-z0-9]{32}$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_KEY_ID_RE = re.compile(r"^key_[A-Za-z0-9_-]{8,64}$")


@dataclass(frozen=True, slots=True)
class KeyFormatCheck:
    """A key that passed the checks, with what looked unusual about it."""

    provider: str
    warnings: tuple[str, ...] = ()


def _has_control(text: str) -> bool:
    return any(unicodedata.category(ch)[0] == "C" for ch in text)


def check_provider(provider: str) -> str:
    """The provider's canonical name (lower case), or :class:`UnknownProvider`."""
    if not isinstance(provider, str) or not provider.strip():
        raise UnknownProvider(f"a provider is required: one of {', '.join(KNOWN_PROVIDERS)}")
    name = provider.strip().lower()
    if name not in KNOWN_PROVIDERS:
        shown = provider if len(provider) <= 40 and not _has_control(provider) else "that name"
        raise UnknownProvider(
            f"unknown provider {shown!r}: use one of {', '.join(KNOWN_PROVIDERS)}"
        )
    return name


def check_workspace_id(workspace_id: str) -> str:
    """The workspace id, or :class:`InvalidInput`: required, unpadded, bounded, printable."""
    if not isinstance(workspace_id, str) or not workspace_id.strip():
        raise InvalidInput("a workspace id is required")
    if workspace_id != workspace_id.strip():
        raise InvalidInput("the workspace id must not start or end with whitespace")
    if len(workspace_id) > MAX_WORKSPACE_LENGTH:
        raise InvalidInput(f"the workspace id is longer than {MAX_WORKSPACE_LENGTH} characters")
    if _has_control(workspace_id):
        raise InvalidInput("the workspace id contains control characters")
    return workspace_id


def check_label(label: str | None) -> str:
    """The label (``default`` when none is given), or :class:`InvalidInput`."""
    if label is None:
        return DEFAULT_LABEL
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput("the label must not be empty")
    if label != label.strip():
        raise InvalidInput("the label must not start or end with whitespace")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidInput(f"the label is longer than {MAX_LABEL_LENGTH} characters")
    if _has_control(label):
        raise InvalidInput("the label contains control characters")
    return label


def check_key_id(key_id: str) -> str:
    """The key id (``key_`` and letters or digits), or :class:`InvalidInput`."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise InvalidInput("a key id looks like 'key_' followed by letters and digits")
    return key_id


def check_api_key(provider: str, api_key: str) -> KeyFormatCheck:
    """Check an API key's shape for a provider. Raises :class:`InvalidKeyFormat` (whose message
    never quotes the key) or returns the warnings for a key that is only unusual."""
    provider = check_provider(provider)
    if not isinstance(api_key, str):
        raise InvalidKeyFormat(f"the {provider} key must be text")
    if api_key == "":
        raise InvalidKeyFormat(f"the {provider} key is empty")
    for position, ch in enumerate(api_key, start=1):
        if ch.isspace() or _has_control(ch):
            kind = "whitespace" if ch.isspace() else "a control character"
            raise InvalidKeyFormat(
                f"the {provider} key contains {kind} at character {position} of "
                f"{len(api_key)}; paste the key alone, without spaces or line breaks"
            )
        if not ch.isascii():
            raise InvalidKeyFormat(
                f"the {provider} key contains a non-ASCII character at character {position} of "
                f"{len(api_key)}; provider keys are plain ASCII"
            )
    if len(api_key) < MIN_KEY_LENGTH:
        raise InvalidKeyFormat(
            f"the {provider} key is {len(api_key)} characters long; provider keys are at least "
            f"{MIN_KEY_LENGTH}"
        )
    if len(api_key) > MAX_KEY_LENGTH:
        raise InvalidKeyFormat(
            f"the {provider} key is {len(api_key)} characters long; the limit is {MAX_KEY_LENGTH}"
        )
    required = _REQUIRED_PREFIX.get(provider)
    if required is not None and not api_key.startswith(required):
        raise InvalidKeyFormat(
            f"{provider} keys start with {required!r} and this one does not; check that it is "
            f"the {provider} key"
        )
    warnings: list[str] = []
    if provider == "openai":
        if api_key.startswith("sk-ant-"):
            raise InvalidKeyFormat(
                "this looks like an Anthropic key (it starts with 'sk-ant-'); store it with "
                "--provider anthropic"
            )
        if api_key.startswith("sk-admin-"):
            warnings.append("this looks like an OpenAI admin key, which cannot call models")
        elif not (
            api_key.startswith(("sk-proj-", "sk-svcacct-", "sk-None-"))
            or re.fullmatch(r"sk-[A-Za-z0-9]{48}", api_key)
        ):
            warnings.append("unusual OpenAI key shape (expected sk-proj-..., sk-svcacct-...)")
    elif provider == "anthropic":
        if api_key.startswith("sk-ant-admin"):
            warnings.append("this looks like an Anthropic Admin API key, which cannot call models")
        elif not api_key.startswith("sk-ant-api"):
            warnings.append("unusual Anthropic key shape (expected sk-ant-api03-...)")
    elif provider == "google":
        if api_key.startswith("AIza"):
            if len(api_key) != 39:
                warnings.append(
                    f"unusual Gemini key length {len(api_key)} (standard keys have 39 characters)"
                )
        elif not api_key.startswith("AQ."):
            warnings.append("unusual Gemini key shape (expected AIza... or AQ....)")
    elif provider == "mistral":
        if not _MISTRAL_RE.match(api_key):
            warnings.append("unusual Mistral key shape (expected 32 letters and digits)")
    elif provider == "exa" and not _UUID_RE.match(api_key):
        warnings.append("unusual Exa key shape (expected a UUID)")
    return KeyFormatCheck(provider=provider, warnings=tuple(warnings))


def mask(api_key: str) -> str:
    """The display hint: the first 6 and the last 4 characters, as ``sk-pro...abcd``.

    Keys are at least :data:`MIN_KEY_LENGTH` (20) characters, so at most half of a key shows,
    and for prefixed keys the first part is the public prefix.
    """
    if len(api_key) < MIN_KEY_LENGTH:
        return "..."
    return f"{api_key[:6]}...{api_key[-4:]}"
