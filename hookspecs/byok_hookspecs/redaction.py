"""One redaction function for every text that may carry a key across a boundary.

A provider (or a gateway in front of it) may echo the key it was sent in an error message, and
not always as an exact copy: a prefix of it, ``bearer <key>`` in another case, the key inside a
JSON string (``\\/`` for ``/``), URL-encoded. Any such text that can reach output, logs, the
ledger or an audit event goes through :func:`redact` first, with the keys that could be in it.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote

__all__ = ["MIN_SECRET_RUN", "REDACTED", "redact"]

#: what stands in for anything removed
REDACTED = "[redacted]"
#: a run of at least this many characters of a key (in any case) is removed wherever it appears
MIN_SECRET_RUN = 8

# a credential after a scheme or a name, whatever the key: Bearer xyz, x-api-key: xyz, key=xyz
# (also "api_key": "xyz", x-goog-api-key=xyz, Authorization: Basic xyz)
_AFTER_MARKER = re.compile(
    r"""(?ix)
    (
      \b(?:bearer|basic)\s+
    | \b(?:x-(?:goog-)?api-key|api[_-]?key|access[_-]?key|key)
      ["']?\s*[:=]\s*["']?
    )
    [^\s"'<>,;&)}\[\]]+
    """
)

# a key a provider masked itself (sk-*****GYvFc1): its visible ends go too
_MASKED = re.compile(r"(?<![\w*])[\w\-]*\*{3,}[\w\-]+")


def _lower(text: str) -> str:
    """``text`` in lower case, one character for one (so positions stay the same)."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in text)


def _forms(secret: str) -> set[str]:
    """The forms a key takes once echoed: as is, JSON-escaped, URL-encoded (lower case)."""
    forms = {secret, quote(secret, safe=""), quote(secret, safe="/:")}
    escaped = json.dumps(secret, ensure_ascii=True)[1:-1]
    forms |= {escaped, escaped.replace("/", "\\/"), json.dumps(escaped)[1:-1]}
    return {_lower(f) for f in forms if f}


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without any of ``secrets``, without a key the provider masked itself
    (``sk-*****GYvFc1``) and without anything that follows ``Bearer``, ``x-api-key``, ``key=``
    and the like.

    A secret is removed in any case, in each of its forms (as is, JSON-escaped, URL-encoded), and
    so is every run of :data:`MIN_SECRET_RUN` or more consecutive characters of one of those forms
    (a prefix, a suffix, a half of the key). A secret shorter than that is removed where it appears
    whole. Each removed stretch becomes ``[redacted]``.
    """
    if not text:
        return text
    low = _lower(text)
    hidden = bytearray(len(text))
    n = MIN_SECRET_RUN
    for secret in secrets:
        if not secret:
            continue
        for form in _forms(secret):
            if len(form) < n:
                start = low.find(form)
                while start != -1:
                    hidden[start : start + len(form)] = b"\1" * len(form)
                    start = low.find(form, start + 1)
                continue
            grams = {form[i : i + n] for i in range(len(form) - n + 1)}
            for i in range(len(low) - n + 1):
                if low[i : i + n] in grams:
                    hidden[i : i + n] = b"\1" * n
    if any(hidden):
        parts: list[str] = []
        i = 0
        while i < len(text):
            if hidden[i]:
                while i < len(text) and hidden[i]:
                    i += 1
                parts.append(REDACTED)
            else:
                j = hidden.find(b"\1", i)
                j = len(text) if j == -1 else j
                parts.append(text[i:j])
                i = j
        text = "".join(parts)
    text = _MASKED.sub(REDACTED, text)
    return _AFTER_MARKER.sub(lambda m: m.group(1) + REDACTED, text)
